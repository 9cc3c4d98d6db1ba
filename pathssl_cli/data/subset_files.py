"""The subset file format that `pathssl subsample` writes and every evaluation and segmentation run reads::

    # pathssl-subset {"version": 1, "fraction": 0.01, "seed": 0, "source": {...}, "counts": {...}}
    id,label
    ADI/ADI-AAAFLCLY.tif,ADI

The first line is a comment holding JSON metadata (`subset_metadata`); then a CSV with the item id and its class
(or tissue type). `read_subset(path)` returns the ids in file order (sorted by item position). Readers only:
nothing here knows how datasets are opened, so the dataset layer can read subset files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.data.datasets.base import count_text
from pathssl_cli.errors import SpecError

__all__ = ["FORMAT_VERSION", "MAGIC", "read_subset", "read_subset_indices", "read_subset_rows", "subset_metadata"]

MAGIC = "# pathssl-subset "
FORMAT_VERSION = 1


def subset_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a subset file ({} for a hand-written file without the comment line)."""
    path = Path(path)
    with _open(path) as fh:
        first = fh.readline()
    if not first.startswith(MAGIC):
        return {}
    try:
        meta = json.loads(first[len(MAGIC):])
    except json.JSONDecodeError as error:
        raise SpecError(f"{path}: line 1: metadata is not valid JSON ({error}). Rewrite the file with "
                        "`pathssl subsample`.") from None
    return meta if isinstance(meta, dict) else {}


def read_subset_rows(path: str | Path) -> list[tuple[str, str | None]]:
    """(id, label or None) per row of a subset file; the label column is optional in hand-written files."""
    path = Path(path)
    with _open(path) as fh:
        lines = [line for line in fh if not line.startswith("#")]
    reader = csv.reader(lines)
    header = [c.strip() for c in next(reader, [])]
    if "id" not in header:
        raise SpecError(f"{path}: expected a header row with an 'id' column (and optionally 'label'), found "
                        f"{header}. Subset files are written by `pathssl subsample`.")
    id_col, label_col = header.index("id"), header.index("label") if "label" in header else None
    rows = [(row[id_col], row[label_col] if label_col is not None else None) for row in reader if row]
    if not rows:
        raise SpecError(f"{path}: the subset lists no items.")
    ids = [item for item, _ in rows]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{path}: ids repeat ({len(ids) - len(set(ids))} duplicates); each item is listed "
                        "once.")
    return rows


def read_subset(path: str | Path) -> list[str]:
    """The item ids of a subset file: relative paths, ``idx:<row>``, CoNSeP stems or PanNuke indices."""
    return [item for item, _ in read_subset_rows(path)]


def read_subset_indices(path: str | Path) -> np.ndarray:
    """A PanNuke subset as int64 indices into the fold's arrays (images.npy, masks.npy, types.npy)."""
    ids = read_subset(path)
    bad = [item for item in ids if not item.isdigit()]
    if bad:
        raise SpecError(f"{path}: ids {count_text(bad)} are not array indices; this is not a PanNuke subset.")
    return np.array([int(item) for item in ids], dtype=np.int64)


def _open(path: Path) -> io.TextIOWrapper:
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{path}: cannot read the subset file ({error.strerror}).") from None
