"""What every peer comparison shares: thread settings, contenders in this or another interpreter, interleaved
repeats, medians, and the machine report printed beside the figures.

A contender is a function `fn(**kwargs) -> JSON-able result` in one of the comparison modules beside this file.
It runs either here (the peer is importable in this interpreter) or in a worker process started with another
virtual environment's python (`python harness.py --serve`), for peers whose pins cannot live beside pathssl's
(TIAToolbox pins torch < 2.13, histolab numpy <= 1.24.4, the hover-net package scikit-image < 0.20). The worker
imports only the standard library, numpy and the peer; both sides time the call the same way, inside the
process that does the work: wall seconds, and CPU seconds of that process plus any children it reaped (pool
workers), so a parallel run's CPU cost is counted whole.

Nothing here imports pathssl: a worker in a peer's environment does not have it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "TIFFSLIDE_NUM_DECODE_THREADS",
)


def one_thread() -> None:
    """Every library on one thread, in this process and (through the environment) its children.

    Called before numpy, OpenCV or torch are imported by the comparison modules: OpenMP and BLAS read their
    variables once, at load time. Per-worker figures then mean one core each.
    """
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    os.environ.setdefault("PATHSSL_PROGRESS", "0")


def settle_threads() -> None:
    """After import: OpenCV and torch keep their own pools, set them too (when present)."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    result: Any = None


def measure(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Measured:
    """Wall and CPU seconds of one call (CPU: this process, plus children that ended during the call)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(**kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return Measured(wall, cpu, result)


def _call(module: str, function: str, kwargs: dict[str, Any]) -> Measured:
    settle_threads()
    fn = getattr(importlib.import_module(module), function)
    settle_threads()  # the module may have imported torch or cv2
    return measure(fn, kwargs)


class Contender:
    """One tool's side of a comparison: `run(**kwargs)` -> Measured."""

    def __init__(self, label: str, module: str, function: str, python: str | None = None) -> None:
        self.label, self.module, self.function, self.python = label, module, function, python
        self._worker: subprocess.Popen[str] | None = None

    @property
    def where(self) -> str:
        return "this process" if self.python is None else f"worker: {self.python}"

    def run(self, **kwargs: Any) -> Measured:
        if self.python is None:
            return _call(self.module, self.function, kwargs)
        if self._worker is None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
            self._worker = subprocess.Popen(
                [self.python, str(HERE / "harness.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=str(ROOT),
            )
        assert self._worker.stdin is not None and self._worker.stdout is not None
        self._worker.stdin.write(json.dumps([self.module, self.function, kwargs]) + "\n")
        self._worker.stdin.flush()
        line = self._worker.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the worker ({self.python}) died; its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.label} failed in its worker ({self.python}):\n{reply['error']}")
        return Measured(reply["wall_s"], reply["cpu_s"], reply["result"])

    def versions(self, packages: list[str]) -> dict[str, str]:
        """Installed versions of `packages` where this contender runs."""
        code = (
            "import json,sys\nfrom importlib.metadata import version\nout={}\n"
            "for p in sys.argv[1:]:\n    try: out[p]=version(p)\n    except Exception: out[p]='-'\n"
            "print(json.dumps(out))"
        )
        done = subprocess.run([self.python or sys.executable, "-c", code, *packages], capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else {p: "?" for p in packages}

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stdin.close()  # type: ignore[union-attr]
            self._worker.wait(timeout=60)
            self._worker = None


def serve() -> None:
    """Worker loop: one JSON request per stdin line ([module, function, kwargs]), one JSON reply per line."""
    one_thread()
    out = sys.stdout
    sys.stdout = sys.stderr  # a peer that prints must not corrupt the replies
    for line in sys.stdin:
        module, function, kwargs = json.loads(line)
        try:
            done = _call(module, function, kwargs)
            reply = {"wall_s": done.wall_s, "cpu_s": done.cpu_s, "result": done.result}
        except Exception:
            reply = {"error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def find_peer(
    label: str, import_name: str, module: str, function: str, python: str | None, install: str
) -> Contender | None:
    """The peer here if importable, else in `python` (another venv) if it imports there, else None with a
    line saying how to install it."""
    if importlib.util.find_spec(import_name) is not None:
        return Contender(label, module, function)
    if python:
        check = subprocess.run([python, "-c", f"import {import_name}"], capture_output=True, text=True)
        if check.returncode == 0:
            return Contender(label, module, function, python)
        print(f"skipped {label}: `import {import_name}` fails in {python}: {check.stderr.strip().splitlines()[-1:]}")
        return None
    print(f"skipped {label}: {import_name} is not installed here. {install}")
    return None


@dataclass
class Series:
    """Repeats of one contender: wall and CPU seconds per repeat, and the last result."""

    label: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    result: Any = None

    def median_wall(self) -> float:
        return statistics.median(self.wall)

    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def interleave(contenders: list[Contender], repeats: int, warmup: bool = True, **kwargs: Any) -> dict[str, Series]:
    """Round-robin repeats, the order rotated each round, so that load from other users hits every contender
    alike. A first untimed call per contender pays imports and caches (a user's second slide, not a cold
    start)."""
    series = {c.label: Series(c.label) for c in contenders}
    if warmup:
        for contender in contenders:
            series[contender.label].result = contender.run(**kwargs).result
    for round_ in range(repeats):
        order = contenders[round_ % len(contenders) :] + contenders[: round_ % len(contenders)]
        for contender in order:
            done = contender.run(**kwargs)
            row = series[contender.label]
            row.wall.append(done.wall_s)
            row.cpu.append(done.cpu_s)
            row.result = done.result
    return series


def paired_ratio(
    fast: Series, slow: Series, count_fast: float, count_slow: float, clock: str = "wall"
) -> tuple[float, float, float]:
    """Median over rounds of (items/s of `fast`) / (items/s of `slow`) in the same round, with the range.

    clock "wall" compares elapsed time; "cpu" compares CPU seconds (per core: other users' load shows in wall
    time only)."""
    times = (fast.wall, slow.wall) if clock == "wall" else (fast.cpu, slow.cpu)
    ratios = [(count_fast / f) / (count_slow / s) for f, s in zip(*times, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def machine_report() -> list[str]:
    """Lines saying where the figures come from: CPU, cores this process may use, thread settings, load."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = " ".join(f"{name}={os.environ.get(name, '-')}" for name in THREAD_VARIABLES)
    lines = [
        f"machine: {platform.node()} {model}, {os.cpu_count()} cores ({affinity} usable), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"threads: {threads}; OpenCV and torch set to 1 thread in every process",
        load_average() + " (the machine is shared: compare ratios measured in the same run)",
    ]
    return lines


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit("usage: python harness.py --serve (started by the comparison scripts)")
