"""`pathssl study`: the paper's grid as one spec (see `pathssl_cli.specs.study`)."""

from pathssl_cli.study.execute import run_study
from pathssl_cli.study.plan import build_plan, plan_problems

__all__ = ["build_plan", "plan_problems", "run_study"]
