"""`pathssl segment score` and map readers: pairing, formats, errors (exit 2), CoNSeP and PanNuke layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io as sio
import tifffile
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.errors import SpecError
from pathssl_cli.segment.io import CONSEP_MERGE, read_consep_label, read_instance_map
from pathssl_cli.segment.metrics import METRIC_KEYS, instance_stats
from pathssl_cli.segment.score import run_score


def _maps(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = np.zeros((40, 40), np.int32)
    pred = np.zeros((40, 40), np.int32)
    for k in range(1, 6):
        r, c = rng.integers(0, 32, 2)
        true[r : r + 7, c : c + 7] = k
        pred[r + 1 : r + 8, c : c + 7] = 10 + k
    return true, pred


def _generic_folders(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    true_dir.mkdir()
    pred_dir.mkdir()
    pairs = {}
    for i, name in enumerate(["a", "b"]):
        true, pred = _maps(i)
        pairs[name] = (true, pred)
        np.save(true_dir / f"{name}.npy", true)
        cv2.imwrite(str(pred_dir / f"{name}.png"), pred.astype(np.uint16))  # other tools write 16-bit PNG
    cv2.imwrite(str(pred_dir / "a_overlay.png"), np.zeros((40, 40, 3), np.uint8))  # no truth: ignored
    return true_dir, pred_dir, pairs


def test_generic_folders_pair_by_name_json_and_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    true_dir, pred_dir, pairs = _generic_folders(tmp_path)
    out_csv = tmp_path / "scores.csv"
    result = run_score(true_dir, pred_dir, as_json=True, out_csv=out_csv)
    printed = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in printed["per_image"]] == ["a", "b"]
    assert set(METRIC_KEYS) <= set(printed["mean"])
    for row, name in zip(result["per_image"], ["a", "b"], strict=True):
        expected = instance_stats(*pairs[name])
        assert all(row[k] == pytest.approx(expected[k]) for k in METRIC_KEYS)
    for key in METRIC_KEYS:
        assert result["mean"][key] == pytest.approx(np.mean([r[key] for r in result["per_image"]]))
    with open(out_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["a", "b"] and float(rows[0]["pq"]) == pytest.approx(
        result["per_image"][0]["pq"]
    )


def test_table_output_and_single_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    true, _ = _maps(3)
    np.save(tmp_path / "t.npy", true)
    np.save(tmp_path / "p.npy", true * 3)  # other ids, same nuclei
    result = run_score(tmp_path / "t.npy", tmp_path / "p.npy")
    assert result["mean"]["pq"] == pytest.approx(1.0)
    table = capsys.readouterr().out
    assert "pq" in table.splitlines()[0] and "mean" in table


def test_predict_output_folder_is_read_from_maps(tmp_path: Path) -> None:
    true, pred = _maps(5)
    np.save(tmp_path / "x.npy", true)
    out = tmp_path / "predictions"
    (out / "maps").mkdir(parents=True)
    (out / "instances").mkdir()
    np.save(out / "maps" / "x.npy", pred)
    np.save(out / "maps" / ".x.scratch.npy", np.zeros((3, 3)))  # an unfinished write: hidden, ignored
    (out / "instances" / "x.json").write_text("[]")
    result = run_score(tmp_path / "x.npy", out / "maps")
    assert result["per_image"][0]["pq"] == pytest.approx(instance_stats(true, pred)["pq"])
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    np.save(truth_dir / "x.npy", true)
    assert run_score(truth_dir, out)["per_image"][0]["name"] == "x"


def test_errors_are_spec_errors_naming_the_file(tmp_path: Path) -> None:
    true_dir, pred_dir, _ = _generic_folders(tmp_path)
    np.save(true_dir / "c.npy", np.zeros((40, 40), np.int32))  # no prediction named c
    with pytest.raises(SpecError, match=r"c\.npy"):
        run_score(true_dir, pred_dir)
    (true_dir / "c.npy").unlink()
    np.save(pred_dir / "b.npy", np.zeros((30, 40), np.int32))  # .npy wins over .png for name b: wrong shape
    with pytest.raises(SpecError, match=r"b\.npy.*shape"):
        run_score(true_dir, pred_dir)
    np.save(pred_dir / "b.npy", np.full((40, 40), 0.5))
    with pytest.raises(SpecError, match=r"b\.npy.*non-integer"):
        run_score(true_dir, pred_dir)
    (pred_dir / "b.npy").unlink()
    cv2.imwrite(str(pred_dir / "b.png"), np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(SpecError, match=r"b\.png.*channels"):
        run_score(true_dir, pred_dir)


def test_cli_exit_codes(tmp_path: Path) -> None:
    true_dir, pred_dir, _ = _generic_folders(tmp_path)
    ok = CliRunner().invoke(
        cli, ["segment", "score", "--true", str(true_dir), "--pred", str(pred_dir), "--json"]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["format"] == "generic"
    np.save(true_dir / "missing.npy", np.zeros((40, 40), np.int32))
    bad = CliRunner().invoke(cli, ["segment", "score", "--true", str(true_dir), "--pred", str(pred_dir)])
    assert bad.exit_code == 2 and "missing.npy" in bad.output
    assert "Traceback" not in bad.output


def test_empty_images_give_null_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "t.npy", np.zeros((8, 8), np.int32))
    np.save(tmp_path / "p.npy", np.zeros((8, 8), np.int32))
    run_score(tmp_path / "t.npy", tmp_path / "p.npy", as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["per_image"][0]["pq"] is None and printed["n_undefined"] == 1


# ---------------------------------------------------------------------------------------------- CoNSeP
def test_consep_loader_round_trip(shared_data: Path, tmp_path: Path) -> None:
    labels = sorted((shared_data / "nuclei" / "consep-tiles" / "Labels").glob("*.mat"))
    assert len(labels) == 64
    total = 0
    for path in labels[:8]:
        label = read_consep_label(path)
        ids = np.unique(label.inst_map[label.inst_map > 0])
        total += len(ids)
        assert label.inst_map.shape == (256, 256) and label.type_map.shape == (256, 256)
        assert ids.max(initial=0) <= len(label.inst_type) == len(label.inst_centroid)
        assert set(np.unique(label.type_map)) <= {0, 1, 2, 3, 4}  # already merged to 4 classes
        for k in ids[:5]:  # inst_type[k - 1] is the type of id k, and the type map agrees
            assert np.all(label.type_map[label.inst_map == k] == label.inst_type[k - 1])
        # Round trip through the generic formats keeps the map exactly.
        np.save(tmp_path / "x.npy", np.stack([label.inst_map, label.type_map], -1))
        inst, types = read_instance_map(tmp_path / "x.npy")
        assert np.array_equal(inst, label.inst_map) and np.array_equal(types, label.type_map)
        cv2.imwrite(str(tmp_path / "x.png"), label.inst_map.astype(np.uint16))
        assert np.array_equal(read_instance_map(tmp_path / "x.png")[0], label.inst_map)
        tifffile.imwrite(tmp_path / "x.tif", label.inst_map.astype(np.int32))
        assert np.array_equal(read_instance_map(tmp_path / "x.tif")[0], label.inst_map)
    assert total > 100


def test_consep_seven_type_merge(tmp_path: Path) -> None:
    inst = np.arange(1, 8, dtype=np.int32).reshape(1, 7).repeat(2, axis=0)
    sio.savemat(
        tmp_path / "x.mat",
        {
            "inst_map": inst.astype(float),
            "type_map": inst.astype(float),
            "inst_type": np.arange(1, 8)[:, None].astype(float),
            "inst_centroid": np.zeros((7, 2)),
        },
    )
    merged = read_consep_label(tmp_path / "x.mat", merge_types=True)
    assert merged.inst_type.tolist() == [1, 2, 3, 3, 4, 4, 4] == [CONSEP_MERGE[i] for i in range(1, 8)]
    assert merged.type_map[0].tolist() == [1, 2, 3, 3, 4, 4, 4]
    assert read_consep_label(tmp_path / "x.mat").inst_type.tolist() == list(range(1, 8))


def test_consep_truth_against_itself_scores_one(
    shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = shared_data / "nuclei" / "consep-tiles"
    result = run_score(root, root / "Labels", as_json=True)
    capsys.readouterr()
    assert result["format"] == "consep" and len(result["per_image"]) == 64
    for key in METRIC_KEYS:
        assert result["mean"][key] == pytest.approx(1.0), key
    assert result["detection"]["f1"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in result["detection"]["per_type"].values())


# ---------------------------------------------------------------------------------------------- PanNuke
def test_pannuke_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    masks = np.zeros((3, 32, 32, 6))
    masks[0, 2:8, 2:8, 0] = 1
    masks[0, 12:18, 12:18, 1] = 2
    masks[1, 4:10, 4:10, 3] = 7
    masks[2, 20:28, 20:28, 4] = 3
    masks[..., 5] = masks[..., :5].sum(-1) == 0
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    true_dir.mkdir()
    pred_dir.mkdir()
    np.save(true_dir / "masks.npy", masks)
    np.save(true_dir / "types.npy", np.array(["Breast", "Colon", "Breast"]))
    pred = masks.copy()
    pred[2] = 0  # image 2 missed entirely
    np.save(pred_dir / "masks.npy", pred)
    result = run_score(true_dir, pred_dir, as_json=True)
    capsys.readouterr()
    assert result["format"] == "pannuke"
    assert result["per_tissue"]["Breast"]["mpq"] == pytest.approx(0.5)  # images 0 (1.0) and 2 (0.0)
    assert result["per_tissue"]["Colon"]["mpq"] == pytest.approx(1.0)
    assert result["mpq"] == pytest.approx(0.75) and result["bpq"] == pytest.approx(0.75)
    assert [row["tissue"] for row in result["per_image"]] == ["Breast", "Colon", "Breast"]
    assert result["mean"]["pq"] == pytest.approx(2 / 3)
    np.save(pred_dir / "masks.npy", pred[:2])
    with pytest.raises(SpecError, match=r"masks\.npy"):
        run_score(true_dir, pred_dir)
