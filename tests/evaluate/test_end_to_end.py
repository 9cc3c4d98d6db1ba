"""`pathssl evaluate linear|knn|finetune` end to end on synthetic labelled tiles with a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pathssl_cli.cli import cli

SPECS = Path(__file__).resolve().parents[2] / "specs" / "evaluate"


def invoke(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def common(root: Path, weights: Path, out: Path) -> list[str]:
    return [
        "--set",
        f"data.root={root}",
        "--set",
        f"model.weights={weights}",
        "--set",
        f"run.output_dir={out}",
        "--set",
        "model.img_size=32",
    ]


def read_metrics(out: Path) -> dict:  # type: ignore[type-arg]
    record = json.loads((out / "metrics.json").read_text())
    assert (out / "per_class.csv").is_file() and (out / "confusion_matrix.png").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    return record


def test_linear_cli(tiny_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "linear"
    invoke(
        "evaluate",
        "linear",
        str(SPECS / "tiny_linear.toml"),
        *common(tiny_folder, tiny_weights, out),
        "--set",
        "optim.epochs=10",
    )
    record = read_metrics(out)
    assert record["protocol"] == "linear" and record["dataset"] == "folder" and record["eval_split"] == "test"
    assert record["weights_id"].startswith("sha256:")
    top1 = record["metrics"]["top1"]
    assert len(top1["values"]) == 2  # two seeds in tiny_linear.toml
    # 6 textures: chance is 1/6; the synthetic textures differ in colour and structure, so even a small random
    # CNN's features separate most of them.
    assert top1["mean"] > 0.5
    assert len(json.loads((out / "sweep.json").read_text())) == 2 * 2 * 2  # lr × wd × seeds


def test_knn_cli(tiny_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "knn"
    invoke("evaluate", "knn", str(SPECS / "tiny_knn.toml"), *common(tiny_folder, tiny_weights, out))
    record = read_metrics(out)
    assert record["label"] == "knn_k20" and set(record["variants"]) == {"knn_k200"}
    assert record["metrics"]["top1"]["mean"] > 0.5


def test_finetune_cli_one_epoch(tiny_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "finetune"
    invoke("evaluate", "finetune", str(SPECS / "tiny_finetune.toml"), *common(tiny_folder, tiny_weights, out))
    record = read_metrics(out)
    assert record["protocol"] == "finetune"
    assert (out / "best_seed0.pt").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "val_top1" in json.loads(lines[0])


def test_missing_root_is_a_spec_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["evaluate", "linear", str(SPECS / "tiny_linear.toml"), "--set", f"data.root={tmp_path / 'nowhere'}"],
    )
    assert result.exit_code == 2
    assert "nowhere" in result.output


@pytest.mark.parametrize(
    "field,value", [("optim.lrs", "[]"), ("optim.weight_decays", "[-1.0]"), ("run.seeds", "[1, 1]")]
)
def test_bad_sweep_grid_is_refused(tiny_folder: Path, field: str, value: str) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "linear",
            str(SPECS / "tiny_linear.toml"),
            "--set",
            f"data.root={tiny_folder}",
            "--set",
            f"{field}={value}",
        ],
    )
    assert result.exit_code == 2
    assert field.split(".")[1] in result.output


def test_linear_on_a_low_label_subset(tiny_folder: Path, tiny_weights: Path, tmp_path: Path) -> None:
    subsets = tmp_path / "subsets"
    specs_root = SPECS.parent
    invoke(
        "subsample",
        str(specs_root / "subsample" / "tiny.toml"),
        "--set",
        f"data.root={tiny_folder}",
        "--set",
        f"run.output_dir={subsets}",
    )
    out = tmp_path / "runs" / "linear_half"
    invoke(
        "evaluate",
        "linear",
        str(SPECS / "tiny_linear.toml"),
        *common(tiny_folder, tiny_weights, out),
        "--set",
        f"data.train_subset={subsets / 'subset_50pct.csv'}",
        "--set",
        "optim.epochs=2",
    )
    record = read_metrics(out)
    # 5 train images per class in the fixture: half of each class, rounded half up, is 3 → 6 classes × 3
    assert record["n"]["train"] == 18
    assert record["label"] == "linear[subset_50pct]"
    assert record["train_subset"].endswith("subset_50pct.csv")


def test_finetune_early_stopping_and_resume(
    tiny_folder: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import pathssl_cli.evaluate.finetune as finetune

    # A validation score that never improves after the first epoch: patience 1 must stop after epoch 2.
    monkeypatch.setattr(finetune, "selection_metric", lambda *args, **kwargs: torch.tensor([0.5]))
    out = tmp_path / "runs" / "ft_stop"
    args = [
        "evaluate",
        "finetune",
        str(SPECS / "tiny_finetune.toml"),
        *common(tiny_folder, tiny_weights, out),
        "--set",
        "optim.epochs=5",
        "--set",
        "optim.patience=1",
    ]
    invoke(*args)
    epochs_logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs_logged == [1, 2]
    assert torch.load(out / "best_seed0.pt", weights_only=True)["epoch"] == 1
    # Running again resumes from last_seed0.pt, which already met the stopping rule: no further epoch runs.
    invoke(*args)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
