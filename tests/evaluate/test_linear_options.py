"""`evaluate linear` with `probe.kind = "lbfgs"` and `features.normalize = true`, end to end, and their spec checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.evaluate import standardize

SPECS = Path(__file__).resolve().parents[2] / "specs" / "evaluate"


def lbfgs_spec(tmp_path: Path, root: Path, weights: Path, out: Path, extra: str = "") -> Path:
    spec = tmp_path / "lbfgs.toml"
    spec.write_text(f"""
kind = "linear"
[data]
dataset = "folder"
root = "{root}"
[model]
backbone = "resnet_tiny"
weights = "{weights}"
img_size = 32
[probe]
kind = "lbfgs"
cs = [0.01, 1.0, 100.0]
[features]
normalize = true
[run]
output_dir = "{out}"
seeds = [0, 1]
device = "cpu"
workers = 0
{extra}
""")
    return spec


def test_lbfgs_probe_on_normalised_features_end_to_end(
    tiny_folder: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitted_on: list[int] = []
    original = standardize.Standardizer.fit.__func__  # type: ignore[attr-defined]

    def spy(cls: type, train: torch.Tensor) -> standardize.Standardizer:
        fitted_on.append(int(train.shape[0]))
        return original(cls, train)

    monkeypatch.setattr(standardize.Standardizer, "fit", classmethod(spy))
    out = tmp_path / "runs" / "lbfgs"
    result = CliRunner().invoke(cli, ["evaluate", "linear", str(lbfgs_spec(tmp_path, tiny_folder, tiny_weights,
                                                                            out))])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.json").read_text())
    # The statistics come from the training split alone: one fit, on exactly its items (not train + val + test).
    assert fitted_on == [record["n"]["train"]]
    normalization = record["settings"]["feature_normalization"]
    assert normalization["statistics_from"] == "train" and normalization["n_fit"] == record["n"]["train"]
    settings = record["settings"]
    assert settings["probe"] == "lbfgs" and settings["cs"] == [0.01, 1.0, 100.0]
    assert settings["refit_on"] == "train+val" and settings["max_iter"] == 1000
    assert "lrs" not in settings  # the minibatch sweep's settings were not used, so they are not recorded
    # Deterministic: one fit, reported once, not copied per seed (std 0 over copies would look like stability).
    assert [row["seed"] for row in record["per_seed"]] == [0]
    assert record["per_seed"][0]["C"] in (0.01, 1.0, 100.0)
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["C"] for row in sweep] == [0.01, 1.0, 100.0]
    assert record["metrics"]["top1"]["mean"] > 0.5  # 6 textures, chance 1/6


def test_minibatch_probe_records_the_normalisation(tiny_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "sgd"
    result = CliRunner().invoke(cli, [
        "evaluate", "linear", str(SPECS / "tiny_linear.toml"), "--set", f"data.root={tiny_folder}",
        "--set", f"model.weights={tiny_weights}", "--set", f"run.output_dir={out}", "--set", "model.img_size=32",
        "--set", "optim.epochs=2", "--set", "features.normalize=true"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["probe"] == "minibatch" and settings["feature_normalization"]["method"] == "standardize"


@pytest.mark.parametrize("sets,named", [
    (["probe.kind=lbfgs"], "optim.lrs"),  # tiny_linear.toml sets the minibatch sweep
    (["probe.cs=[1.0]"], "probe.cs"),  # an L-BFGS option on the minibatch probe
    (["probe.refit=false"], "probe.refit"),
])
def test_options_of_the_other_probe_are_refused(tiny_folder: Path, sets: list[str], named: str) -> None:
    args = ["evaluate", "linear", str(SPECS / "tiny_linear.toml"), "--set", f"data.root={tiny_folder}"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert named in result.output and "probe.kind" in result.output and "Traceback" not in result.output


def test_non_positive_c_is_refused(tiny_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    spec = lbfgs_spec(tmp_path, tiny_folder, tiny_weights, tmp_path / "out")
    spec.write_text(spec.read_text().replace("cs = [0.01, 1.0, 100.0]", "cs = [0.0, 1.0]"))
    result = CliRunner().invoke(cli, ["evaluate", "linear", str(spec)])
    assert result.exit_code == 2 and "probe.cs" in result.output
