"""A run is done only while everything its result depends on is unchanged (issue 20 §1): the spec, and the
inputs named by path (weights and subset files by their bytes, data folders by their listing) and what pathssl
computes for that spec (the command's protocol version), all recorded in run.json's `fingerprints`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.runs import open_run, run_state
from pathssl_cli.specs import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A labelled folder, a weights file and a subset file: the inputs a linear run names by path."""
    from pathssl_cli.backbones import create_backbone, export_backbone
    from pathssl_cli.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("fingerprint_inputs")
    data = write_image_folder(root / "data", n_per_class=4, size=32, seed=0)
    torch.manual_seed(1)
    weights = export_backbone(create_backbone("resnet_tiny", img_size=32), root / "w" / "backbone.safetensors")
    subsets = {}
    for seed in (0, 7):  # `labels.seed` of a study: another seed keeps other images
        result = CliRunner().invoke(cli, ["subsample", str(SPECS / "subsample" / "tiny.toml"), "--set",
                                          f"data.root={data}", "--set", f"subsample.seed={seed}", "--set",
                                          f"run.output_dir={root / f'subsets{seed}'}"])
        assert result.exit_code == 0, result.output
        subsets[seed] = root / f"subsets{seed}" / "subset_50pct.csv"
    assert subsets[0].read_bytes() != subsets[7].read_bytes()
    return {"data": data, "weights": weights, "subset": subsets[0], "other_subset": subsets[7]}


def linear_spec(p: dict[str, Path], out: Path, *extra: str) -> Any:
    return load_spec(SPECS / "evaluate" / "tiny_linear.toml",
                     [f"data.root={p['data']}", f"model.weights={p['weights']}", f"data.train_subset={p['subset']}",
                      f"run.output_dir={out}", "model.img_size=32", *extra])


def finished_run(spec: Any, out: Path) -> Path:
    """A run directory as a finished run leaves it (run.json 'done'), without computing anything."""
    with open_run(spec, out):
        pass
    assert run_state(spec, out).status == "done"
    return out


def test_weights_replaced_at_the_same_path_make_the_run_stale(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The weights file of a re-run pretrain is another backbone under the same name: the old result is stale."""
    import shutil

    from pathssl_cli.backbones import create_backbone, export_backbone

    p = dict(inputs, weights=tmp_path / "w" / "backbone.safetensors")
    p["weights"].parent.mkdir()
    shutil.copy(inputs["weights"], p["weights"])
    spec = linear_spec(p, tmp_path / "run")
    finished_run(spec, tmp_path / "run")
    torch.manual_seed(2)
    export_backbone(create_backbone("resnet_tiny", img_size=32), p["weights"])
    state = run_state(spec, tmp_path / "run")
    assert state.status == "stale" and any(c.startswith("model.weights") for c in state.changes), state


def test_a_rewritten_subset_file_makes_the_run_stale(inputs: dict[str, Path], tmp_path: Path) -> None:
    p = dict(inputs, subset=tmp_path / "subset.csv")
    p["subset"].write_text(inputs["subset"].read_text())
    spec = linear_spec(p, tmp_path / "run")
    finished_run(spec, tmp_path / "run")
    p["subset"].write_text(inputs["other_subset"].read_text())  # as `pathssl subsample` with another seed
    state = run_state(spec, tmp_path / "run")
    assert state.status == "stale" and any(c.startswith("data.train_subset") for c in state.changes), state


def test_an_image_added_to_the_data_folder_makes_the_run_stale(inputs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(inputs["data"], data)
    spec = linear_spec(dict(inputs, data=data), tmp_path / "run")
    finished_run(spec, tmp_path / "run")
    first = next((data / "train").rglob("*.png"))
    shutil.copy(first, first.with_name("added.png"))
    state = run_state(spec, tmp_path / "run")
    assert state.status == "stale" and any(c.startswith("data.root") for c in state.changes), state


def test_a_release_config_beside_the_weights_is_an_input(inputs: dict[str, Path], tmp_path: Path) -> None:
    """model.normalization = 'auto' reads a timm release's config.json beside the weights: adding one changes
    the inputs' statistics, so the run is stale."""
    import shutil

    p = dict(inputs, weights=tmp_path / "w" / "model.safetensors")
    p["weights"].parent.mkdir()
    shutil.copy(inputs["weights"], p["weights"])
    spec = linear_spec(p, tmp_path / "run")
    finished_run(spec, tmp_path / "run")
    config = {"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (p["weights"].parent / "config.json").write_text(json.dumps(config))
    state = run_state(spec, tmp_path / "run")
    assert state.status == "stale" and any("config.json" in c for c in state.changes), state


def test_a_run_json_without_fingerprints_is_an_old_run(inputs: dict[str, Path], tmp_path: Path) -> None:
    """A run recorded before pathssl fingerprinted its inputs (or versioned its protocols) cannot be checked: a
    ViT linear run from before [features] existed computed pooled CLS features that the preset no longer means."""
    spec = linear_spec(inputs, tmp_path / "run")
    out = finished_run(spec, tmp_path / "run")
    record = json.loads((out / "run.json").read_text())
    record.pop("fingerprints", None)
    (out / "run.json").write_text(json.dumps(record))
    state = run_state(spec, out)
    assert state.status == "stale" and any("before" in c for c in state.changes), state


def test_a_protocol_bump_makes_the_run_stale(inputs: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pathssl_cli.runs import protocols

    spec = linear_spec(inputs, tmp_path / "run")
    out = finished_run(spec, tmp_path / "run")
    bumped = {**protocols.HISTORY["linear"], max(protocols.HISTORY["linear"]) + 1: "a test's change"}
    monkeypatch.setitem(protocols.HISTORY, "linear", bumped)
    state = run_state(spec, out)
    assert state.status == "stale" and any("protocol" in c and "a test's change" in c for c in state.changes)


def test_unchanged_inputs_keep_the_run_done(inputs: dict[str, Path], tmp_path: Path) -> None:
    spec = linear_spec(inputs, tmp_path / "run")
    finished_run(spec, tmp_path / "run")
    os.utime(inputs["data"])  # a folder's own time is not part of its listing; its files' are
    assert run_state(linear_spec(inputs, tmp_path / "run"), tmp_path / "run").status == "done"


def test_a_listing_is_names_sizes_and_times_below_the_folder(tmp_path: Path) -> None:
    """Relative names (a moved folder is the same data), sizes and mtimes; names starting with '.' (a tile
    store's .index cache, writes in flight) are not data. Never the files' bytes."""
    import shutil

    from pathssl_cli.runs.fingerprints import listing_digest

    data = tmp_path / "a" / "data"
    (data / "x").mkdir(parents=True)
    (data / "x" / "1.png").write_bytes(b"one")
    (data / "2.png").write_bytes(b"two")
    first = listing_digest(data)
    (data / ".index").mkdir()
    (data / ".index" / "state").write_bytes(b"cache")
    (data / ".tmp-2.png").write_bytes(b"in flight")
    assert listing_digest(data) == first
    moved = tmp_path / "b" / "data"
    moved.parent.mkdir()
    os.replace(data, moved)
    assert listing_digest(moved) == first
    shutil.copy(moved / "2.png", moved / "3.png")
    assert listing_digest(moved) != first
    (moved / "3.png").unlink()
    assert listing_digest(moved) == first
    stat = (moved / "2.png").stat()
    os.utime(moved / "2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert listing_digest(moved) != first


def test_weights_are_hashed_once_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-GB weights file is read once per process; a file replaced at the same path (a new inode), even
    with the same size and time, is read again."""
    from pathssl_cli.runs import fingerprints

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    reads: list[Path] = []
    real = fingerprints._hash_file
    monkeypatch.setattr(fingerprints, "_hash_file", lambda p: reads.append(p) or real(p))
    first = fingerprints.file_sha256(path)
    assert fingerprints.file_sha256(path) == first and len(reads) == 1
    stat = path.stat()
    (tmp_path / "new.bin").write_bytes(b"b" * 100)
    os.utime(tmp_path / "new.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp_path / "new.bin", path)
    assert fingerprints.file_sha256(path) != first and len(reads) == 2


def test_linear_refuses_a_stale_run_naming_the_input_and_force_reruns(inputs: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    args = ["evaluate", "linear", str(SPECS / "evaluate" / "tiny_linear.toml"), "--set", f"data.root={inputs['data']}",
            "--set", f"model.weights={inputs['weights']}", "--set", f"data.train_subset={tmp_path / 'subset.csv'}",
            "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "model.img_size=32", "--set", "optim.epochs=1"]
    (tmp_path / "subset.csv").write_text(inputs["subset"].read_text())
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    (tmp_path / "subset.csv").write_text(inputs["other_subset"].read_text())
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "data.train_subset" in result.output and "--force" in result.output and "Traceback" not in result.output
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before  # nothing was touched
    result = CliRunner().invoke(cli, ["--force", *args])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("run.replaced-*/metrics.json"))) == 1
    assert run_state(linear_spec(dict(inputs, subset=tmp_path / "subset.csv"), tmp_path / "run", "optim.epochs=1"),
                     tmp_path / "run").status == "done"


def test_training_resumes_by_its_narrower_rule_but_not_onto_replaced_weights(inputs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """Train-resume (here finetune's) keeps its own rule: a run recorded before fingerprints existed still resumes
    (a long training is not lost to an upgrade) and stays unverified, so a study reruns it; a weights file
    replaced under the run is refused, where resuming would finish a model begun from other weights."""
    import shutil

    from pathssl_cli.backbones import create_backbone, export_backbone

    weights = tmp_path / "w.safetensors"
    shutil.copy(inputs["weights"], weights)
    out = tmp_path / "ft"
    args = ["evaluate", "finetune", str(SPECS / "evaluate" / "tiny_finetune.toml"), "--set",
            f"data.root={inputs['data']}", "--set", f"model.weights={weights}", "--set", f"run.output_dir={out}",
            "--set", "model.img_size=32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    record.pop("fingerprints")
    (out / "run.json").write_text(json.dumps(record))  # as written by pathssl before fingerprints
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "resuming after epoch 1" in result.output, result.output
    spec = load_spec(SPECS / "evaluate" / "tiny_finetune.toml", args[4::2])
    assert run_state(spec, out).status == "stale"  # the resumed run is no more verified than before

    result = CliRunner().invoke(cli, ["--force", *args])
    assert result.exit_code == 0, result.output
    assert run_state(spec, out).status == "done"
    torch.manual_seed(5)
    export_backbone(create_backbone("resnet_tiny", img_size=32), weights)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "model.weights" in result.output and "--force" in result.output, result.output


def _input_fields(model: type, prefix: str = "") -> list[str]:
    """Dotted names of every input-path field of a spec model class, nested sections included."""
    from pydantic import BaseModel

    from pathssl_cli.specs.core import PathMarker
    from pathssl_cli.specs.paths import _marker_of

    def models(annotation: Any) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in getattr(annotation, "__args__", ()) for m in models(arg)]

    found = []
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        marker = next((m for m in info.metadata if isinstance(m, PathMarker)), None) or _marker_of(info.annotation)
        if marker is not None and marker.kind == "input":
            found.append(prefix + name)
        for child in models(info.annotation):
            found += _input_fields(child, f"{prefix}{name}.")
    return found


@pytest.mark.parametrize(("kind", "commands"), [
    ("pretrain", ["pretrain"]), ("linear", ["linear"]), ("knn", ["knn"]), ("finetune", ["finetune"]),
    ("subsample", ["subsample"]), ("segment", ["segment train", "segment eval", "segment predict"])])
def test_every_input_field_is_fingerprinted_or_said_not_to_matter(kind: str, commands: list[str]) -> None:
    """A new input field is a new way for a result to go stale: each command must fingerprint it or say why
    its result does not depend on it (runs.fingerprints.INPUTS)."""
    from pathssl_cli.runs.fingerprints import INPUTS
    from pathssl_cli.runs.protocols import protocol_version
    from pathssl_cli.specs import spec_model

    fields = _input_fields(spec_model(kind))
    assert fields
    for command in commands:
        inputs = INPUTS[command]
        declared = {*inputs.content, *inputs.data, *inputs.ignored}
        assert set(fields) <= declared, (command, set(fields) - declared)
        assert declared <= set(fields), (command, declared - set(fields))  # no stale names either
        assert protocol_version(command) is not None
