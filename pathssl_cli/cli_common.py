"""What every `pathssl` command shares: the error-to-exit-code group, the SPEC argument with `--set`, spec loading.

Exit codes: 0 success; 1 the work ran but failed; 2 the spec or the arguments are invalid (nothing started).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import click

from pathssl_cli.errors import PathsslError

SET_HELP = "Override a spec value, parsed as TOML: --set tiles.mpp=[0.25,0.5]. Repeatable."


class PathsslGroup(click.Group):
    """Turns pathssl's user-facing errors into a message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PathsslError as exc:
            if os.environ.get("RANK", "0") == "0":
                click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if os.environ.get("PATHSSL_DEBUG"):
                raise
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            click.echo(f"error: unexpected failure: {detail}\n(set PATHSSL_DEBUG=1 to see the traceback; "
                       "please report it with the spec you ran)", err=True)
            ctx.exit(1)


def spec_argument(func: Any) -> Any:
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(func)
    return click.argument("spec", type=click.Path(path_type=Path))(func)


def load_command_spec(spec: Path, overrides: tuple[str, ...], kind: str) -> Any:
    from pathssl_cli.specs import load_spec

    return load_spec(spec, overrides, kind=kind)


def limit_cpu_threads(count: int) -> None:
    """Cap torch's intra-op threads and OpenCV's pool at `count` for the whole process.

    Why: torch starts one thread per core; on a node shared with other jobs those threads wait on each other at
    every barrier, and a CPU training step measured 12x slower (7.7 against 90 img/s beside one other process).
    DataLoader workers and torchrun's ranks already run one thread each, so this only changes the main process.
    """
    import cv2
    import torch

    torch.set_num_threads(count)
    cv2.setNumThreads(count)

