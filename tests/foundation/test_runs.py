"""Run directories, atomic writes, checkpoints, metrics log, registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pathssl_cli import specs as specs_module
from pathssl_cli.errors import PathsslError, SpecError, WorkFailed
from pathssl_cli.fileio import atomic_path, atomic_write
from pathssl_cli.registry import Registry
from pathssl_cli.runs import MetricsLog, load_checkpoint, open_run, save_checkpoint
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


# ------------------------------------------------------------------------------ the shared run-directory rule
def test_run_rule_states_and_digest_fields(toy_spec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pathssl_cli.runs import claim_run_dir, run_state, spec_digest

    out = tmp_path / "rule"
    assert claim_run_dir(toy_spec, out).status == "new"
    with pytest.raises(WorkFailed), open_run(toy_spec, out):
        raise WorkFailed("disk full")
    failed = run_state(toy_spec, out)
    assert failed.status == "failed" and failed.error == "disk full"
    with open_run(toy_spec, out):
        pass
    assert claim_run_dir(toy_spec, out).status == "done"
    assert json.loads((out / "run.json").read_text())["spec_digest"] == spec_digest(toy_spec)
    # Where the run is written is not part of what it computes; the learning rate is.
    moved = toy_spec.model_copy(deep=True)
    moved.run.output_dir = tmp_path / "elsewhere"
    assert spec_digest(moved) == spec_digest(toy_spec)
    changed = toy_spec.model_copy(deep=True)
    changed.optim.lr = 0.5
    with pytest.raises(SpecError, match=r"optim\.lr: 0\.001 → 0\.5") as refused:
        claim_run_dir(changed, out)
    assert refused.value.exit_code == 2 and "--force" in str(refused.value)
    # Forcing moves the old run aside (nothing is deleted) and starts a new one.
    assert claim_run_dir(changed, out, force=True).status == "new"
    assert not out.exists() and len(list(tmp_path.glob("rule.replaced-*/run.json"))) == 1


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished one-epoch fine-tune of a tiny CNN on 32 px synthetic tiles, plus a second weights file and a
    low-label subset: the inputs of the issue's scenario (#11 item 2)."""
    from click.testing import CliRunner

    from pathssl_cli.backbones import create_backbone, export_backbone
    from pathssl_cli.cli import cli
    from pathssl_cli.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("finetune_rule")
    data = write_image_folder(root / "data", n_per_class=4, size=32, seed=0)
    weights = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        weights[seed] = export_backbone(create_backbone("resnet_tiny", img_size=32),
                                        root / f"w{seed}" / "backbone.safetensors")
    specs = Path(__file__).resolve().parents[2] / "specs"
    result = CliRunner().invoke(cli, ["subsample", str(specs / "subsample" / "tiny.toml"), "--set",
                                      f"data.root={data}", "--set", f"run.output_dir={root / 'subsets'}"])
    assert result.exit_code == 0, result.output
    paths = {"data": data, "w1": weights[1], "w2": weights[2], "subset": root / "subsets" / "subset_50pct.csv",
             "out": root / "ft", "spec": specs / "evaluate" / "tiny_finetune.toml"}
    result = CliRunner().invoke(cli, _finetune_args(paths))
    assert result.exit_code == 0, result.output
    return paths


def _finetune_args(p: dict[str, Path], *extra: str) -> list[str]:
    args = ["evaluate", "finetune", str(p["spec"]), "--set", f"data.root={p['data']}", "--set",
            f"model.weights={p['w1']}", "--set", f"run.output_dir={p['out']}", "--set", "model.img_size=32"]
    for item in extra:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("change", ["optim.lr=0.01", "augment.stain=none", "weights", "subset"])
def test_finetune_rerun_with_another_spec_is_refused(finetune_run: dict[str, Path], change: str) -> None:
    """#11 item 2: a rerun with a different spec used to print "resuming after epoch 1", train nothing and
    report the old accuracy under the new spec.toml."""
    from click.testing import CliRunner

    from pathssl_cli.cli import cli

    p = finetune_run
    item = {"weights": f"model.weights={p['w2']}", "subset": f"data.train_subset={p['subset']}"}.get(change, change)
    before = {name: (p["out"] / name).read_bytes() for name in ("spec.toml", "run.json", "metrics.json")}
    result = CliRunner().invoke(cli, _finetune_args(p, item))
    assert result.exit_code == 2, result.output
    assert "holds a different finetune run" in result.output and "run.output_dir" in result.output
    assert "--force" in result.output and item.split("=")[0] in result.output
    assert "resuming" not in result.output
    # Nothing was written: the old run's files are exactly as they were.
    assert {name: (p["out"] / name).read_bytes() for name in before} == before


def test_finetune_unchanged_rerun_resumes_and_force_starts_over(finetune_run: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from pathssl_cli.cli import cli

    p = dict(finetune_run, out=tmp_path / "ft")
    shutil.copytree(finetune_run["out"], p["out"])
    logged = (p["out"] / "metrics.jsonl").read_text()
    result = CliRunner().invoke(cli, _finetune_args(p))
    assert result.exit_code == 0, result.output
    # The finished epoch is resumed, not retrained.
    assert (p["out"] / "metrics.jsonl").read_text() == logged
    result = CliRunner().invoke(cli, ["--force", *_finetune_args(p, "optim.lr=0.01")])
    assert result.exit_code == 0, result.output
    assert "lr = 0.01" in (p["out"] / "spec.toml").read_text()
    assert len(list(tmp_path.glob("ft.replaced-*/metrics.json"))) == 1


def test_segment_digest_leaves_out_moved_data_and_longer_schedules(tmp_path: Path) -> None:
    """segment train's documented exclusions (formerly its own training_digest): data folders may move and the
    epoch counts may grow, but the learning rate or the label subset make another run."""
    from pathssl_cli.runs import spec_digest
    from pathssl_cli.specs.segment import SegmentSpec

    def digest(**changes: object) -> str:
        spec = SegmentSpec.model_validate({"data": {"format": "generic", "train": [str(tmp_path / "a")]},
                                           "run": {"output_dir": str(tmp_path / "run")}})
        for dotted, value in changes.items():
            section, _, name = dotted.partition("__")
            setattr(getattr(spec, section), name, value)
        return spec_digest(spec)

    base = digest()
    assert digest(data__train=[tmp_path / "moved"]) == base
    assert digest(train__phase2_epochs=80, train__workers=0, run__resume=False) == base
    assert digest(train__lr=1e-3) != base
    assert digest(data__subset=tmp_path / "subset_10pct.csv") != base
    assert digest(run__seed=1) != base


def test_a_field_added_later_at_its_default_keeps_old_runs_resumable(toy_spec, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run written before pathssl grew a field (absent from its spec.toml) is still the same run while the new
    field holds its default; setting it makes another run."""
    from pathssl_cli.runs import run_state

    out = tmp_path / "old"
    with open_run(toy_spec, out):
        pass
    text = (out / "spec.toml").read_text()
    assert "schedule = " in text
    (out / "spec.toml").write_text("\n".join(line for line in text.splitlines() if not line.startswith("schedule")))
    assert run_state(toy_spec, out).status == "done"
    changed = toy_spec.model_copy(deep=True)
    changed.optim.schedule = "step"
    assert run_state(changed, out).status == "different"
