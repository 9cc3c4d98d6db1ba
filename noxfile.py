"""Developer sessions: `nox -s tests lint typecheck smoke`.

Installing torch into a fresh environment costs about a minute, so every session reuses its virtualenv
(`nox -r`) and `smoke`/`tests` can also run in the current environment with `--no-venv`.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "smoke"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "pathssl_cli", "tests", "benchmarks", "scripts", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "pathssl_cli")


@nox.session
def smoke(session: nox.Session) -> None:
    """Chain the CLI as a user's CI would: validate specs, tile, pretrain, evaluate, segment, report."""
    session.install("-e", ".")
    session.run("bash", "scripts/smoke.sh", *session.posargs)
