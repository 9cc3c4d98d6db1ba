"""Fingerprints: what a run's result depends on besides its spec, recorded in run.json and compared by the rule.

- Files a result is computed from (weights, subset lists, stain statistics, a trained model): the sha256 of
  their bytes, `sha256:<hex>`. Each file version is hashed once per process: the cache key is (path, size,
  mtime_ns, inode), and a file replaced at the same path (a re-run pretrain's export, written under a temporary
  name and renamed) has a new inode, so it is hashed again even with the same size and time.
- Data folders: a listing digest, `listing:<hex>:<files>`, of every file's path relative to the folder, size
  and mtime_ns, never the bytes, so a data set is not re-read on every check. Names starting with '.' are left
  out (a tile store's .index cache, writes in flight). A folder moved with its files' times keeps its listing.
  A data file named directly (a CSV dataset, PanNuke's types.npy) is hashed like a weights file: it holds the
  labels and is small.
- `protocol`: the command's version (`protocols.py`).

Which spec fields are inputs of which command is declared once, in INPUTS; every input-path field of a spec
kind is either fingerprinted there or listed with the reason it does not change the result (a test checks it).
A study's pretrain run enters the runs that use it as its exported backbone.safetensors: a weights file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathssl_cli.runs.protocols import protocol_version, why_version

#: Where `segment train` writes the trained model that `segment eval` and `predict` read by default.
SEGMENT_MODEL_FILE = "model.pt"


def segment_model_path(spec: Any) -> Path:
    """The trained HoVer-Net of a segment spec: model.checkpoint, else <run.output_dir>/model.pt."""
    return Path(spec.model.checkpoint) if spec.model.checkpoint else Path(spec.run.output_dir) / SEGMENT_MODEL_FILE


# -------------------------------------------------------------------------------------------- file contents
_HASHES: dict[tuple[str, int, int, int], str] = {}


def _hash_file(path: Path) -> tuple[str, os.stat_result, os.stat_result]:
    """sha256 of the bytes, with the file's stat before and after reading (from the same descriptor)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        while block := fh.read(1 << 20):
            digest.update(block)
        after = os.fstat(fh.fileno())
    return digest.hexdigest(), before, after


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes, read once per file version per process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHES:
        hexdigest, before, after = _hash_file(path)
        read_key = (key[0], before.st_size, before.st_mtime_ns, before.st_ino)
        unchanged = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        if not unchanged or read_key != key:  # written to while read, or replaced since the stat: no caching
            return hexdigest
        _HASHES[key] = hexdigest
    return _HASHES[key]


# --------------------------------------------------------------------------------------------- data listings
def listing_digest(folder: str | Path) -> str:
    """`listing:<hex>:<n files>` over (relative path, size, mtime_ns) of every file below `folder`.

    Order-independent (a sum of per-file hashes modulo 2^256), so nothing is sorted or held per file: memory
    stays constant for folders of millions of images. Symbolic links to folders are followed once each.
    """
    total, count = 0, 0
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, str]] = [(Path(folder), "")]
    while stack:
        directory, prefix = stack.pop()
        stat = directory.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = prefix + entry.name
                try:
                    if entry.is_dir():
                        stack.append((Path(entry.path), name + "/"))
                        continue
                    stat = entry.stat()
                    line = f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}"
                except OSError:  # a dangling link, or a file removed while listed
                    line = f"{name}\0unreadable"
                total = (total + int.from_bytes(hashlib.sha256(line.encode()).digest(), "big")) % (1 << 256)
                count += 1
    return f"listing:{total:064x}:{count}"


def path_fingerprint(path: Path) -> str:
    """A file: `sha256:<hex>`; a folder: its listing (never its files' bytes); `missing` when nothing is there."""
    try:
        if path.is_dir():
            return listing_digest(path)
        return f"sha256:{file_sha256(path)}"
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


# ----------------------------------------------------------------------------------------- inputs per command
def _dotted(spec: Any, name: str) -> Any:
    value = spec
    for part in name.split("."):
        value = getattr(value, part, None)
    return value


def _segment_eval_value(spec: Any, name: str) -> Any:
    if name == "model.checkpoint":
        return segment_model_path(spec)
    if name == "data.val":  # evaluated only when there is no test split
        return [] if spec.data.test else spec.data.val
    return _dotted(spec, name)


@dataclass(frozen=True)
class Inputs:
    """The inputs of one command's result (`content`: files such as weights and subset lists; `data`: data
    folders, or a data file), and the input-path fields of its spec kind that do not change its result
    (`ignored`: field -> why). Either way a file is fingerprinted by its bytes and a folder by its listing."""

    content: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)
    value: Callable[[Any, str], Any] = _dotted
    beside: Callable[[Any], dict[str, Path]] | None = None  # files read because of a field, not named by one


def _release_config(spec: Any) -> dict[str, Path]:
    """A timm release's config.json beside the weights file: model.normalization = 'auto' takes its mean/std
    (backbones.resolve_normalization), so adding, editing or removing it changes the result."""
    weights = spec.model.weights
    if str(weights) == "random" or str(getattr(spec.model, "normalization", "auto")) != "auto":
        return {}
    return {"model.weights config.json": Path(weights).parent / "config.json"}


_CLASSIFICATION = Inputs(content=("model.weights", "data.train_subset"), data=("data.root",), beside=_release_config)
_TRAINED_MODEL = "in the trained model's sha256 (model.checkpoint)"

INPUTS: dict[str, Inputs] = {
    "pretrain": Inputs(content=("model.weights", "augment.stain_statistics"), data=("data.tiles",),
                       beside=_release_config),
    "linear": _CLASSIFICATION,
    "knn": _CLASSIFICATION,
    "finetune": _CLASSIFICATION,
    "subsample": Inputs(data=("data.root", "images.root"),
                        ignored={"data.train_subset": "subsets are drawn from the whole train split, never from "
                                                      "another subset (data.subsets)"}),
    "segment train": Inputs(
        content=("model.weights", "data.subset"), data=("data.train",), beside=_release_config,
        ignored={"data.val": "scored for the loss curve only; the model does not depend on it",
                 "data.test": "read by segment eval", "model.checkpoint": "read by segment eval and predict"}),
    "segment eval": Inputs(
        content=("model.checkpoint",), data=("data.test", "data.val"), value=_segment_eval_value,
        ignored={"data.train": _TRAINED_MODEL, "data.subset": _TRAINED_MODEL, "model.weights": _TRAINED_MODEL}),
    "segment predict": Inputs(
        content=("model.checkpoint",), value=_segment_eval_value,
        ignored={"data.train": _TRAINED_MODEL, "data.subset": _TRAINED_MODEL, "model.weights": _TRAINED_MODEL,
                 "data.val": "not read", "data.test": "not read (predict reads predict.inputs, slide by slide)"}),
}


def _paths(value: Any) -> Iterator[Path]:
    for item in value if isinstance(value, list | tuple) else [value]:
        if item is not None and str(item) != "random":
            yield Path(item)


def input_fingerprints(spec: Any, command: str) -> dict[str, Any] | None:
    """{'protocol': version, field: fingerprint, ...} of `command`'s result; None for a command without a
    protocol version. A list field (data.train) is one entry: its items' fingerprints joined by ' + '."""
    version = protocol_version(command)
    if version is None:
        return None
    found: dict[str, Any] = {"protocol": version}
    inputs = INPUTS.get(command, Inputs())
    for name in (*inputs.content, *inputs.data):
        paths = list(_paths(inputs.value(spec, name)))
        if paths:
            found[name] = " + ".join(path_fingerprint(p) for p in paths)
    for name, path in (inputs.beside(spec) if inputs.beside else {}).items():
        found[name] = path_fingerprint(path)
    return found


def _describe(name: str, old: Any, new: Any) -> str:
    if "missing" in (old, new):
        return f"{name}: {'now missing' if new == 'missing' else 'was missing, now present'}"
    if isinstance(old, str) and isinstance(new, str):
        if old.startswith("sha256:") and new.startswith("sha256:"):
            return f"{name}: its contents changed (sha256 {old[7:19]}… → {new[7:19]}…)"
        if old.startswith("listing:") and new.startswith("listing:") and " + " not in old + new:
            return (f"{name}: its files changed ({old.rsplit(':', 1)[1]} → {new.rsplit(':', 1)[1]} files; names, "
                    "sizes or modification times differ)")
    return f"{name}: its files changed"


@dataclass(frozen=True)
class Comparison:
    """changed: inputs recorded with another fingerprint; unrecorded: inputs the run never recorded."""

    changed: tuple[str, ...] = ()
    unrecorded: tuple[str, ...] = ()


def compare(recorded: dict[str, Any] | None, current: dict[str, Any] | None, command: str) -> Comparison:
    if current is None:
        return Comparison()
    if not isinstance(recorded, dict):
        return Comparison(unrecorded=(
            "inputs: the run was recorded before pathssl fingerprinted inputs and versioned protocols, so neither "
            "its inputs nor what pathssl computed then can be checked",))
    changed, unrecorded = [], []
    for name, value in current.items():
        if name not in recorded:
            unrecorded.append(f"{name}: not recorded by the run (an older pathssl)")
        elif recorded[name] != value and name == "protocol":
            changed.append(f"protocol: {recorded[name]} → {value} (pathssl now computes {command} differently: "
                           f"{why_version(command, value)}; see pathssl_cli/runs/protocols.py)")
        elif recorded[name] != value:
            changed.append(_describe(name, recorded[name], value))
    return Comparison(tuple(changed), tuple(unrecorded))
