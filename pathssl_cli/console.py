"""Terminal output: messages on stderr from rank 0 only, and progress bars that stay quiet off a TTY."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _is_rank_zero() -> bool:
    # torchrun sets RANK; every other launch is a single process.
    return os.environ.get("RANK", "0") == "0"


def info(message: str) -> None:
    if _is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if _is_rank_zero():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def progress_enabled() -> bool:
    """Bars only on an interactive terminal, so CI logs and piped output stay readable."""
    if os.environ.get("PATHSSL_PROGRESS") == "1":
        return True
    if os.environ.get("PATHSSL_PROGRESS") == "0":
        return False
    return _is_rank_zero() and sys.stderr.isatty()


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar (ETA and rate included) on stderr; disabled off a TTY and on ranks other than 0."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(), dynamic_ncols=True,
                file=sys.stderr, **kwargs)


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    with progress(total=total, desc=desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)
