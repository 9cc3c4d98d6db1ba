"""`pathssl demo`: the whole chain on synthetic data (steps.py), its shared state (state.py) and its report
(report.py)."""

from pathssl_cli.demo.steps import run_demo

__all__ = ["run_demo"]
