"""The metrics log of a run: append-only JSONL, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path
from typing import Any

from pathssl_cli.fileio import json_default


class MetricsLog:
    """Append-only JSONL metrics (one object per line), mirrored to TensorBoard when it is installed."""

    def __init__(self, path: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self._writer: Any = None
        self._tensorboard = tensorboard

    def _open_writer(self) -> None:
        # On first use only: importing TensorBoard imports torch (seconds, ~600 MB), which commands that never
        # log metrics (tile) must not pay.
        self._tensorboard = False
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def log(self, step: int, **values: float) -> None:
        record = {"step": step, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=json_default) + "\n")
        if self._tensorboard:
            self._open_writer()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(key, value, step)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
