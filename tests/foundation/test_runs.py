"""Run directories, atomic writes, checkpoints, metrics log, registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pathssl_cli import specs as specs_module
from pathssl_cli.errors import PathsslError, SpecError, WorkFailed
from pathssl_cli.registry import Registry
from pathssl_cli.runs import MetricsLog, atomic_path, atomic_write, load_checkpoint, open_run, save_checkpoint
from pathssl_cli.specs import load_spec


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, "done")
    assert target.read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_checkpoint_round_trip_is_weights_only(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(4.0)}, "step": 7, "rng": torch.get_rng_state()}
    save_checkpoint(state, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    with pytest.raises(PathsslError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_metrics_log_appends_jsonl(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=False)
    log.log(1, loss=2.0)
    log.log(2, loss=1.5, lr=0.1)
    assert [r["loss"] for r in log.read()] == [2.0, 1.5]


@pytest.fixture
def toy_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setitem(specs_module.SPEC_KINDS, "toy", "toy_spec:ToySpec")
    (tmp_path / "data").mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    path = tmp_path / "toy.toml"
    path.write_text('kind = "toy"\n[data]\nroot = "data"\n')
    subprocess.run(["git", "-C", str(tmp_path), "add", "toy.toml"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "s"],
                   check=True)
    return load_spec(path)


def test_open_run_records_success(toy_spec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with open_run(toy_spec, tmp_path / "run", seed=3) as run:
        run.write_json("metrics.json", {"acc": 1.0})
        running = json.loads((run.path / "run.json").read_text())
        assert running["status"] == "running"
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "done" and record["seed"] == 3 and record["world_size"] == 1
    assert record["git"]["commit"] and record["git"]["dirty"] is False
    assert len(record["spec_sha256"]) == 64 and record["versions"]["torch"] == torch.__version__
    assert 'kind = "toy"' in (tmp_path / "run" / "spec.toml").read_text()


def test_open_run_records_failure(toy_spec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WorkFailed), open_run(toy_spec, tmp_path / "run"):
        raise WorkFailed("loss became NaN at step 3")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == "loss became NaN at step 3"


def test_registry_refuses_duplicates_and_suggests() -> None:
    registry: Registry[int] = Registry("method")
    registry.add("barlow_twins", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("barlow_twins", 2)
    with pytest.raises(SpecError, match="Did you mean 'barlow_twins'"):
        registry.get("barlow_twin")
