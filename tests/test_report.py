"""`pathssl report` on two hand-written run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pathssl_cli.errors import SpecError
from pathssl_cli.report import run_report


def fake_run(
    path: Path,
    *,
    dataset: str,
    protocol: str,
    label: str,
    values: list[float],
    method: str | None,
    weights: str,
    variants: dict | None = None,
) -> Path:  # type: ignore[type-arg]
    path.mkdir(parents=True)
    mean = sum(values) / len(values)
    record = {
        "protocol": protocol,
        "label": label,
        "dataset": dataset,
        "backbone": "resnet50",
        "weights": weights,
        "method": method,
        "metrics": {"top1": {"mean": mean, "std": 0.01, "values": values}},
        "variants": variants or {},
    }
    (path / "metrics.json").write_text(json.dumps(record))
    return path


def test_report_table_from_two_runs(tmp_path: Path) -> None:
    a = fake_run(
        tmp_path / "runs" / "a",
        dataset="crc",
        protocol="linear",
        label="linear",
        values=[0.94, 0.96],
        method="dino",
        weights="/x/runs/dino_tcga/backbone.safetensors",
    )
    b = fake_run(
        tmp_path / "runs" / "b",
        dataset="pcam",
        protocol="knn",
        label="knn_k20",
        values=[0.8],
        method=None,
        weights="random",
        variants={"knn_k200": {"top1": {"mean": 0.75, "std": 0.0, "values": [0.75]}}},
    )
    out = run_report([a, b], tmp_path / "out" / "table.md")
    text = out.read_text().splitlines()
    assert text[2] == "| method | backbone | weights | crc / linear | pcam / knn_k20 | pcam / knn_k200 |"
    # mean of 0.94 and 0.96 = 95.00 %, the std stored (0.01) = 1.00 %; missing cells are dashes
    assert "| - | resnet50 | random | — | 80.00 ± 1.00 | 75.00 ± 0.00 |" in text
    assert "| dino | resnet50 | dino_tcga/backbone | 95.00 ± 1.00 | — | — |" in text
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    dino = next(r for r in rows if r["method"] == "dino")
    assert float(dino["crc / linear mean"]) == pytest.approx(95.0)
    assert dino["crc / linear n"] == "2" and dino["pcam / knn_k20 mean"] == ""
    assert (tmp_path / "out" / "table.png").read_bytes()[:4] == b"\x89PNG"


def test_report_searches_below_a_folder_and_refuses_empty_ones(tmp_path: Path) -> None:
    fake_run(
        tmp_path / "runs" / "x",
        dataset="bach",
        protocol="finetune",
        label="finetune",
        values=[0.5],
        method=None,
        weights="random",
    )
    out = run_report([tmp_path / "runs"], tmp_path / "t.md")
    assert "bach / finetune" in out.read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"holds no metrics\.json"):
        run_report([tmp_path / "empty"], tmp_path / "t2.md")


def test_report_cli_exit_code_for_missing_dir(tmp_path: Path) -> None:
    from pathssl_cli.cli import cli

    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_columns_follow_the_paper_order() -> None:
    from pathssl_cli.report import column_order

    shuffled = [
        "crc / knn_k200",
        "crc / linear",
        "crc / finetune",
        "crc / linear[subset_10pct]",
        "bach / knn_k20",
        "crc / knn_k20",
        "crc / linear[subset_1pct]",
    ]
    assert sorted(shuffled, key=column_order) == [
        "bach / knn_k20",
        "crc / linear[subset_1pct]",
        "crc / linear[subset_10pct]",
        "crc / linear",
        "crc / finetune",
        "crc / knn_k20",
        "crc / knn_k200",
    ]


def test_teacher_and_student_of_one_checkpoint_land_in_different_rows(tmp_path: Path) -> None:
    """Issue 20 §6: `weights_id` and the report's rows ignored `model.weights_network`, so the teacher and the
    student evaluations of one DINO checkpoint shared a cell (the last one read won)."""
    import torch

    from pathssl_cli.backbones import create_backbone
    from pathssl_cli.cli import cli
    from pathssl_cli.synthetic import write_image_folder

    data = write_image_folder(tmp_path / "data", n_per_class=3, size=32, seed=0)
    torch.manual_seed(0)
    state = create_backbone("resnet_tiny", img_size=32).timm_model.state_dict()
    method = {**{f"backbone.timm_model.{k}": v for k, v in state.items()},
              **{f"teacher_backbone.timm_model.{k}": v + 0.5 if v.is_floating_point() else v
                 for k, v in state.items()}}
    checkpoint = tmp_path / "dino" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"method": method, "step": 2}, checkpoint)  # the layout of a pathssl DINO checkpoint
    specs = Path(__file__).resolve().parents[1] / "specs" / "evaluate"
    records = {}
    for network in ("auto", "student"):
        out = tmp_path / "runs" / network
        result = CliRunner().invoke(cli, [
            "evaluate", "knn", str(specs / "tiny_knn.toml"), "--set", f"data.root={data}", "--set",
            f"model.weights={checkpoint}", "--set", f"model.weights_network='{network}'", "--set",
            f"run.output_dir={out}", "--set", "model.img_size=32", "--set", "knn.k=[3]"])
        assert result.exit_code == 0, result.output
        records[network] = json.loads((out / "metrics.json").read_text())
    assert records["auto"]["weights_id"] != records["student"]["weights_id"]
    report = run_report([tmp_path / "runs"], tmp_path / "t.md")
    rows = list(csv.DictReader(report.with_suffix(".csv").open()))
    assert len(rows) == 2 and len({r["weights"] for r in rows}) == 2
    assert any("student" in r["weights"] for r in rows)
