"""Cross-validation by group (`data.folds`, `data.fold`) on csv datasets."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from pathssl_cli.cli import cli
from pathssl_cli.data.benchmarks import open_dataset
from pathssl_cli.errors import SpecError
from pathssl_cli.specs.data import DataSection

CLASSES = ("stroma", "tumour", "lymph")


def write_csv(folder: Path, rows: list[tuple[str, str, str]], name: str = "data.csv") -> Path:
    """A csv dataset of 4×4 PNGs: rows of (file name, label, group)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for file, _, _ in rows:
        if not (images / file).exists():
            Image.new("RGB", (4, 4)).save(images / file)
    table = folder / name
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group"])
        writer.writerows([(f"images/{file}", label, group) for file, label, group in rows])
    return table


def grouped_rows(groups_per_class: int = 4, seed: int = 0) -> list[tuple[str, str, str]]:
    """Groups ("slides") of 2-5 items; most hold one class, every third one mixes two."""
    rng = random.Random(seed)
    rows = []
    for c, label in enumerate(CLASSES):
        for g in range(groups_per_class):
            group = f"slide_{label}_{g}"
            for i in range(rng.randint(2, 5)):
                item_label = CLASSES[(c + 1) % 3] if g % 3 == 2 and i == 0 else label
                rows.append((f"{group}_{i}.png", item_label, group))
    return rows


def splits(table: Path, folds: int, fold: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Per split: the (id, group) pairs it holds."""
    data = DataSection(dataset="csv", root=table, folds=folds, fold=fold, split_seed=seed)
    out = {}
    for name in ("train", "val", "test"):
        ds = open_dataset(data, name)  # type: ignore[arg-type]
        assert ds.groups is not None
        out[name] = list(zip(ds.ids, ds.groups, strict=True))
    return out


def test_no_group_on_two_sides_and_every_item_tested_once(tmp_path: Path) -> None:
    table = write_csv(tmp_path, grouped_rows())
    all_ids = {f"images/{file}" for file, _, _ in grouped_rows()}
    tested: list[str] = []
    for k in range(4):
        parts = splits(table, 4, k)
        groups = {name: {g for _, g in items} for name, items in parts.items()}
        assert not groups["train"] & groups["val"]
        assert not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"]
        ids = [i for items in parts.values() for i, _ in items]
        assert sorted(ids) == sorted(all_ids)  # train, val and test partition the items
        tested += [i for i, _ in parts["test"]]
        # val is the next fold: what fold k + 1 tests.
        assert sorted(parts["val"]) == sorted(splits(table, 4, (k + 1) % 4)["test"])
    assert sorted(tested) == sorted(all_ids)  # each item in exactly one test fold


def test_same_seed_same_folds_whatever_the_row_order(tmp_path: Path) -> None:
    rows = grouped_rows()
    first = write_csv(tmp_path, rows, "a.csv")
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    second = write_csv(tmp_path, shuffled, "b.csv")
    folds_a = [sorted(splits(first, 4, k, seed=3)["test"]) for k in range(4)]
    folds_b = [sorted(splits(second, 4, k, seed=3)["test"]) for k in range(4)]
    assert folds_a == folds_b
    assert folds_a != [sorted(splits(first, 4, k, seed=4)["test"]) for k in range(4)]


def test_folds_are_class_stratified(tmp_path: Path) -> None:
    # 4 single-class groups of 3 items per class, 4 folds: one group of each class per fold is the only
    # stratified assignment; a class-blind one would often put two groups of a class together.
    rows = [(f"{label}_{g}_{i}.png", label, f"{label}_{g}") for label in CLASSES for g in range(4)
            for i in range(3)]
    table = write_csv(tmp_path, rows)
    for k in range(4):
        test = splits(table, 4, k)["test"]
        labels = sorted(i.split("/")[1].split("_")[0] for i, _ in test)
        assert labels == sorted(CLASSES * 3)


def test_val_and_train_come_from_the_training_folds_for_knn(tmp_path: Path) -> None:
    table = write_csv(tmp_path, grouped_rows())
    data = DataSection(dataset="csv", root=table, folds=4, fold=2)
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))  # type: ignore[arg-type]
    assert val.carved_from is not None and train.carved_from is not None
    assert sorted(val.carved_from.ids) == sorted(train.ids + val.ids)
    assert not set(val.carved_from.ids) & set(test.ids)


def test_spec_checks_name_the_field() -> None:
    root = Path("data.csv")
    cases = [
        ({"folds": 5, "fold": 5}, "data.fold = 5, but data.folds = 5"),
        ({"folds": 5}, "needs data.fold"),
        ({"fold": 1}, "needs data.folds"),
        ({"folds": 2, "fold": 0}, "folds"),  # fewer than 3: train, val and test are each a fold
        ({"folds": 3, "fold": 0, "test_fraction": 0.3}, "data.test_fraction cannot be combined"),
        ({"folds": 3, "fold": 0, "dataset": "folder"}, "data.folds applies to 'csv' datasets"),
    ]
    for fields, message in cases:
        with pytest.raises(ValidationError, match=message):
            DataSection(**{"dataset": "csv", "root": root, **fields})


def test_more_folds_than_groups_is_refused(tmp_path: Path) -> None:
    rows = [(f"{g}_{i}.png", CLASSES[i % 3], f"slide{g}") for g in range(4) for i in range(3)]
    table = write_csv(tmp_path, rows)
    with pytest.raises(SpecError, match=r"data.folds = 5, but its rows form only 4 group\(s\)"):
        open_dataset(DataSection(dataset="csv", root=table, folds=5, fold=0), "train")  # type: ignore[arg-type]


def test_a_split_column_and_folds_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    table = tmp_path / "split.csv"
    table.write_text("path,label,split,group\na.png,x,train,s1\n")
    with pytest.raises(SpecError, match="'split' column"):
        open_dataset(DataSection(dataset="csv", root=table, folds=3, fold=0), "test")  # type: ignore[arg-type]


def test_cli_refuses_a_fold_out_of_range_with_exit_2(tmp_path: Path) -> None:
    table = write_csv(tmp_path, grouped_rows())
    spec = tmp_path / "knn.toml"
    spec.write_text(f'kind = "knn"\n[data]\ndataset = "csv"\nroot = "{table}"\nfolds = 4\nfold = 4\n'
                    '[model]\nbackbone = "resnet_tiny"\n[run]\noutput_dir = "out"\n')
    result = CliRunner().invoke(cli, ["evaluate", "knn", str(spec)])
    assert result.exit_code == 2 and "data.fold = 4" in result.output and "Traceback" not in result.output


def test_a_subset_file_drawn_without_folds_is_refused_with_folds(tmp_path: Path) -> None:
    table = write_csv(tmp_path, grouped_rows())
    subset = tmp_path / "subset.csv"
    ids = open_dataset(DataSection(dataset="csv", root=table), "train").ids[:3]  # type: ignore[arg-type]
    labels = {f"images/{file}": label for file, label, _ in grouped_rows()}
    # Metadata as `pathssl subsample` wrote it before folds existed: no folds key.
    subset.write_text('# pathssl-subset {"source": {"kind": "classification", "dataset": "csv"}}\nid,label\n'
                      + "".join(f"{i},{labels[i]}\n" for i in ids))
    data = DataSection(dataset="csv", root=table, folds=4, fold=0, train_subset=subset)
    with pytest.raises(SpecError, match="folds = None in the file, 4 in this spec"):
        open_dataset(data, "train")  # type: ignore[arg-type]


def test_slide_folds_of_the_real_kather_tiles(shared_data: Path, tmp_path: Path) -> None:
    manifest = shared_data / "patches" / "kather2016-dev" / "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = tmp_path / "slides.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group"])
        writer.writerows([(str(manifest.parent / r["path"]), r["label"], r["slide"]) for r in rows])
    slides = sorted({r["slide"] for r in rows})
    tested = []
    for k in range(len(slides)):
        test = open_dataset(DataSection(dataset="csv", root=table, folds=len(slides), fold=k), "test")  # type: ignore[arg-type]
        assert test.groups is not None and len(set(test.groups)) == 1  # five slides, five folds: one each
        tested += list(test.ids)
    assert len(tested) == len(rows) == len(set(tested))
    assert np.unique([r["slide"] for r in rows]).size == len(slides)
