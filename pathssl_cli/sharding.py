"""Which slice of a work list this process takes: one rule for every command that splits slides over machines.

Two splits, which combine:
- the *outer* part, first match wins: explicit `--num-shards N --shard-index I` (both or neither); a SLURM job
  array, only when asked with `--split-array` (`array=True`): `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`,
  ids need not start at 0 (`--array=1-100` starts at `SLURM_ARRAY_TASK_MIN`) and may step (`--array=0-99:2`,
  `SLURM_ARRAY_TASK_STEP`), so the part is (id - min) / step; else the whole list. An array that is not asked
  for is left alone: `sbatch --array=0-9` over ten specs must give each spec all its slides, not a tenth of them;
- the *inner* part: torchrun's `RANK` / `WORLD_SIZE` when `WORLD_SIZE` > 1, so the ranks of one task never do
  the same items twice.
Together: part `outer * world + rank` of `outer_count * world`.

Items are dealt round-robin over the given (sorted) order: the parts are disjoint, cover the list, and differ in
length by at most one. Torch-free on purpose: `pathssl tile` uses it and nothing under tiling/ imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pathssl_cli.errors import SpecError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's part: `index` of `count` (0-based), what decided it (for messages) and, for run.json, the
    outer part and rank it combines (`origin`)."""

    index: int
    count: int
    source: str  # "arguments" | "SLURM array" | "RANK/WORLD_SIZE" | "<outer> x RANK/WORLD_SIZE" | "none"
    origin: dict[str, Any] = field(default_factory=dict, compare=False)

    def take(self, items: Sequence[T]) -> list[T]:
        """This part's items, round-robin over `items`."""
        return list(items[self.index :: self.count])

    @property
    def suffix(self) -> str:
        """File-name suffix that keeps the parts' own outputs apart (`-3-of-10`), empty for the whole list."""
        return f"-{self.index}-of-{self.count}" if self.count > 1 else ""

    def record(self) -> dict[str, Any]:
        """What run.json keeps: the part, where it came from, and what it combined or left alone."""
        return {"index": self.index, "count": self.count, "source": self.source, **self.origin}


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise SpecError(f"environment variable {name}={raw!r} is not an integer") from None


def _array_part(env: Mapping[str, str]) -> tuple[int, int]:
    """(part, parts) of this SLURM array task."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        raise SpecError("--split-array takes this SLURM array task's part of the list, but SLURM_ARRAY_TASK_ID is "
                        "not set: submit with `sbatch --array=...`, or drop --split-array")
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise SpecError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; submit with "
                        "`sbatch --array=...` or pass --num-shards/--shard-index")
    task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    offset = task - first
    if count < 1 or step < 1 or offset % step or not 0 <= offset // step < count:
        raise SpecError(
            f"SLURM array task {task} does not map onto part 0..{count - 1} (SLURM_ARRAY_TASK_MIN={first}, "
            f"STEP={step}, COUNT={count}): use a contiguous range such as `--array=0-{count - 1}`, or "
            "pass --num-shards/--shard-index explicitly")
    return offset // step, count


def _torchrun_rank(env: Mapping[str, str]) -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) outside it."""
    world = _env_int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
    if world <= 1:
        return 0, 1
    rank = _env_int(env, "RANK") if "RANK" in env else -1
    if not 0 <= rank < world:
        raise SpecError(f"WORLD_SIZE={world} needs RANK in 0..{world - 1}, found {env.get('RANK', 'no RANK')}")
    return rank, world


def resolve_shard(num_shards: int | None = None, shard_index: int | None = None, *, array: bool = False,
                  env: Mapping[str, str] | None = None) -> Shard:
    """This process's part of the work list (see the module docstring); SpecError (exit 2) when inconsistent.

    `array`: take the SLURM array task's part (the commands' `--split-array`)."""
    env = os.environ if env is None else env
    if (num_shards is None) != (shard_index is None):
        raise SpecError("--num-shards and --shard-index go together: give both (e.g. --num-shards 10 "
                        "--shard-index 3) or neither")
    origin: dict[str, Any] = {}
    if num_shards is not None and shard_index is not None:
        if array:
            raise SpecError("--split-array and --num-shards/--shard-index both choose the part: give one of them")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise SpecError(f"--shard-index {shard_index} must lie in 0..{num_shards - 1} for --num-shards "
                            f"{num_shards}")
        part, parts, source = shard_index, num_shards, "arguments"
    elif array:
        part, parts = _array_part(env)
        source = "SLURM array"
        origin["array_task"] = {"id": int(env["SLURM_ARRAY_TASK_ID"]), "part": part, "parts": parts}
    else:
        part, parts, source = 0, 1, "none"
        if "SLURM_ARRAY_TASK_ID" in env:
            origin["array_ignored"] = (f"SLURM array task {env['SLURM_ARRAY_TASK_ID']} does the whole list "
                                       "(--split-array not given)")
    rank, world = _torchrun_rank(env)
    if world > 1:
        origin["rank"], origin["world_size"] = rank, world
        source = "RANK/WORLD_SIZE" if source == "none" else f"{source} x RANK/WORLD_SIZE"
    return Shard(part * world + rank, parts * world, source, origin)
