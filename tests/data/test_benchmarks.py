"""Dataset loaders on tiny fakes in the exact official layouts, their layout errors, and the transform."""

from __future__ import annotations

import csv
import gzip
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper

from pathssl_cli.data.benchmarks import DATASETS, eval_transform, open_dataset
from pathssl_cli.data.datasets.base import stratified_holdout
from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.specs.data import DataSection

CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
BACH_PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}


def colour_of(label: int) -> tuple[int, int, int]:
    """A distinct RGB per class, so a test can tell from the pixels which image was loaded."""
    return (20 * label + 10, 255 - 20 * label, (37 * label) % 256)


def write_image(path: Path, label: int, size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    Image.fromarray(np.full((height, width, 3), colour_of(label), np.uint8)).save(path)


def write_crc(root: Path, n_train: int = 10, n_test: int = 2) -> Path:
    for folder, n in (("NCT-CRC-HE-100K", n_train), ("CRC-VAL-HE-7K", n_test)):
        for label, name in enumerate(CRC_CLASSES):
            for i in range(n):
                write_image(root / folder / name / f"{name}-{folder[:3]}{i:05d}.tif", label)
    return root


def write_bach(photos: Path, n: int = 5) -> Path:
    rows = []
    for label, name in enumerate(BACH_PREFIX):
        for i in range(1, n + 1):
            file = f"{BACH_PREFIX[name]}{i:03d}.tif"
            write_image(photos / name / file, label, (32, 24))  # BACH's 4:3 aspect, scaled down
            rows.append(f"{file},{name}")
    (photos / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return photos


def write_pcam(root: Path, n: dict[str, int], gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, count in n.items():
        x = (np.arange(count, dtype=np.uint8)[:, None, None, None] * np.ones((1, 96, 96, 3), np.uint8))
        y = (np.arange(count) % 3 == 0).astype(np.uint8).reshape(count, 1, 1, 1)
        for part, array in (("x", x), ("y", y)):
            path = root / f"camelyonpatch_level_2_split_{split}_{part}.h5"
            with h5py.File(path, "w") as fh:
                fh.create_dataset(part, data=array, chunks=(1, *array.shape[1:]) if part == "x" else None)
            if gz:
                with path.open("rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.unlink()
    return root


def write_mhist(root: Path, rows: list[tuple[str, str, int, str]]) -> Path:
    with (root / "annotations.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        # The official header, votes column included (only used to cross-check the majority label).
        votes = "Number of Annotators who Selected SSA (Out of 7)"
        writer.writerow(["Image Name", "Majority Vote Label", votes, "Partition"])
        writer.writerows(rows)
    for name, label, _, _ in rows:
        write_image(root / "images" / name, 1 if label == "SSA" else 0)
    return root


def mhist_rows(n_train: int = 8, n_test: int = 4) -> list[tuple[str, str, int, str]]:
    rows = []
    for i in range(n_train + n_test):
        label = "SSA" if i % 2 else "HP"
        votes = 5 if label == "SSA" else 1
        rows.append((f"MHIST_{i:03d}.png", label, votes, "train" if i < n_train else "test"))
    return rows


def section(dataset: str, root: Path, **extra: object) -> DataSection:
    return DataSection(dataset=dataset, root=root, **extra)


def pixel_label(dataset, i: int) -> int:
    """Class index encoded in the pixels of item i (see `colour_of`)."""
    return (int(dataset.load_image(i)[0, 0, 0]) - 10) // 20


# ------------------------------------------------------------------------------------------------- registry


def test_registry_holds_one_entry_per_dataset() -> None:
    assert DATASETS.names() == ["bach", "crc", "csv", "folder", "mhist", "pcam"]
    with pytest.raises(ValueError, match="Did you mean 'pcam'"):
        DataSection(dataset="pcamm", root=Path("."))


# ------------------------------------------------------------------------------------------------------ CRC


def test_crc_splits_labels_and_pixels(tmp_path: Path) -> None:
    data = section("crc", write_crc(tmp_path, n_train=10, n_test=2), val_fraction=0.2)
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))
    assert train.classes == list(CRC_CLASSES)
    # 10 per class: round(0.2 * 10) = 2 held out for val, 8 left, none shared, all covered.
    assert set(val.class_counts().values()) == {2} and set(train.class_counts().values()) == {8}
    assert not set(train.ids) & set(val.ids)
    assert len(set(train.ids) | set(val.ids)) == 90
    assert len(test) == 18 and all(i.split("/")[0] == i.split("/")[1].split("-")[0] for i in test.ids)
    for dataset in (train, val, test):
        for i in range(0, len(dataset), 7):
            assert pixel_label(dataset, i) == dataset.targets[i]
            assert dataset.ids[i].startswith(CRC_CLASSES[dataset.targets[i]] + "/")
    image = test.load_image(0)
    assert image.dtype == np.uint8 and image.shape == (16, 24, 3)


def test_crc_val_split_is_seeded(tmp_path: Path) -> None:
    root = write_crc(tmp_path, n_train=10, n_test=1)
    val = lambda seed: open_dataset(section("crc", root, split_seed=seed), "val").ids  # noqa: E731
    assert val(0) == val(0)
    assert val(0) != val(1)


def test_crc_missing_class_folder(tmp_path: Path) -> None:
    root = write_crc(tmp_path, n_train=2, n_test=1)
    shutil.rmtree(root / "CRC-VAL-HE-7K" / "MUS")
    with pytest.raises(SpecError, match=r"missing class folder\(s\) \['MUS'\]") as error:
        open_dataset(section("crc", root), "test")
    assert "CRC-VAL-HE-7K" in str(error.value) and "zenodo" in str(error.value)


def test_crc_stray_folder_is_ignored_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_crc(tmp_path, n_train=1, n_test=1)
    (root / "CRC-VAL-HE-7K" / "old_backup").mkdir()
    assert len(open_dataset(section("crc", root), "test")) == 9
    assert "ignoring folder(s) ['old_backup']" in capsys.readouterr().err


def test_crc_root_pointing_inside_the_layout(tmp_path: Path) -> None:
    root = write_crc(tmp_path, n_train=2, n_test=1)
    with pytest.raises(SpecError, match="must be the folder that holds both"):
        open_dataset(section("crc", root / "NCT-CRC-HE-100K"), "train")


def test_crc_tile_in_the_wrong_class_folder(tmp_path: Path) -> None:
    root = write_crc(tmp_path, n_train=2, n_test=1)
    shutil.move(root / "NCT-CRC-HE-100K" / "ADI" / "ADI-NCT00000.tif", root / "NCT-CRC-HE-100K" / "TUM")
    with pytest.raises(SpecError, match=r"TUM/ADI-NCT00000\.tif"):
        open_dataset(section("crc", root), "train")


def test_unreadable_image_fails_when_loaded(tmp_path: Path) -> None:
    root = write_crc(tmp_path, n_train=1, n_test=1)
    broken = root / "CRC-VAL-HE-7K" / "LYM" / "LYM-CRC00000.tif"
    broken.write_bytes(b"II*\x00 truncated")
    test = open_dataset(section("crc", root), "test")
    position = test.ids.index("LYM/LYM-CRC00000.tif")
    with pytest.raises(WorkFailed, match=r"LYM-CRC00000\.tif: cannot read this image"):
        test.load_image(position)
    # A DataLoader worker wraps the exception with its traceback and the main process re-raises it through
    # torch's ExceptionWrapper; the user must still get the file and the fix, not the worker's traceback.
    # (The wrapper is used directly: a real worker adds seconds of process shutdown to the test.)
    try:
        test.load_image(position)
    except WorkFailed:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    assert "Traceback" in wrapped.exc_msg
    with pytest.raises(WorkFailed) as error:
        wrapped.reraise()
    assert str(error.value).startswith(str(broken)) and "Traceback" not in str(error.value)


def test_real_nct_crc_tiles(shared_data: Path, tmp_path: Path) -> None:
    tiles = sorted((shared_data / "patches" / "nct-crc-he-100k").glob("*.tif"))
    assert len(tiles) == 9
    for folder in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        for tile in tiles:
            (tmp_path / folder / tile.name.split("-")[0]).mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / tile.name.split("-")[0] / tile.name).symlink_to(tile)
    data = section("crc", tmp_path)
    test = open_dataset(data, "test")
    assert [test.classes[t] for t in test.targets] == [t.name.split("-")[0] for t in tiles]
    test.transform = eval_transform(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for i in range(len(test)):
        image = test.load_image(i)
        assert image.shape == (224, 224, 3) and image.dtype == np.uint8
        tensor, label = test[i]
        assert tensor.shape == (3, 64, 64) and label == i
    # One tile per class: nothing can be held out, so train keeps all nine and val is refused clearly.
    assert len(open_dataset(data, "train")) == 9
    with pytest.raises(SpecError, match="no validation split can be held out"):
        open_dataset(data, "val")


# ----------------------------------------------------------------------------------------------------- BACH


@pytest.mark.parametrize("root_level", ["photos", "challenge", "above"])
def test_bach_layout_and_documented_split(tmp_path: Path, root_level: str) -> None:
    photos = write_bach(tmp_path / "ICIAR2018_BACH_Challenge" / "Photos", n=10)
    root = {"photos": photos, "challenge": photos.parent, "above": tmp_path}[root_level]
    data = section("bach", root, test_fraction=0.2, val_fraction=0.25)
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))
    # Per class of 10: round(0.2*10) = 2 test, round(0.25*8) = 2 val, 6 train.
    assert set(test.class_counts().values()) == {2}
    assert set(val.class_counts().values()) == {2}
    assert set(train.class_counts().values()) == {6}
    ids = [set(d.ids) for d in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 40
    assert all(pixel_label(train, i) == train.targets[i] for i in range(len(train)))


def test_bach_csv_label_disagrees_with_folder(tmp_path: Path) -> None:
    photos = write_bach(tmp_path / "Photos")
    table = photos / "microscopy_ground_truth.csv"
    table.write_text(table.read_text().replace("b002.tif,Benign", "b002.tif,Normal"))
    with pytest.raises(SpecError, match=r"b002.tif \(csv: Normal, folder: Benign\)"):
        open_dataset(section("bach", photos), "train")


def test_bach_listed_file_missing_and_unlisted_image(tmp_path: Path) -> None:
    photos = write_bach(tmp_path / "Photos")
    (photos / "Invasive" / "iv003.tif").unlink()
    write_image(photos / "Normal" / "extra.tif", 3)
    with pytest.raises(SpecError) as error:
        open_dataset(section("bach", photos), "test")
    message = str(error.value)
    assert "listed in microscopy_ground_truth.csv but not found: iv003.tif" in message
    assert "not listed in microscopy_ground_truth.csv: extra.tif" in message


def test_bach_without_csv(tmp_path: Path) -> None:
    photos = write_bach(tmp_path / "Photos")
    (photos / "microscopy_ground_truth.csv").unlink()
    with pytest.raises(SpecError, match=r"no microscopy_ground_truth\.csv"):
        open_dataset(section("bach", tmp_path), "train")


# ----------------------------------------------------------------------------------------------------- PCam


def test_pcam_official_splits_read_lazily(tmp_path: Path) -> None:
    root = write_pcam(tmp_path, {"train": 12, "valid": 6, "test": 5})
    data = section("pcam", root)
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 6, 5)
    assert train.classes == ["no_tumor", "tumor"] and train.ids[3] == "idx:3"
    np.testing.assert_array_equal(train.targets, (np.arange(12) % 3 == 0).astype(np.int64))
    assert train._handle is None  # nothing read from the image file until an image is asked for
    assert train.load_image(7).shape == (96, 96, 3) and int(train.load_image(7)[5, 5, 1]) == 7
    clone = pickle.loads(pickle.dumps(train))  # what a DataLoader worker receives
    assert clone._handle is None and int(clone.load_image(11)[0, 0, 0]) == 11
    loader = torch.utils.data.DataLoader(train.select([2, 9]), batch_size=2, num_workers=1)
    images, labels = next(iter(loader))
    assert images[:, 0, 0, 0].tolist() == [2, 9] and labels.tolist() == [0, 1]


def test_pcam_gzipped_files_are_refused_with_the_command(tmp_path: Path) -> None:
    root = write_pcam(tmp_path, {"train": 3}, gz=True)
    with pytest.raises(SpecError, match=r"Run: gunzip .*camelyonpatch_level_2_split_train_x\.h5\.gz"):
        open_dataset(section("pcam", root), "train")


def test_pcam_label_count_mismatch(tmp_path: Path) -> None:
    root = write_pcam(tmp_path, {"test": 4})
    with h5py.File(root / "camelyonpatch_level_2_split_test_y.h5", "w") as fh:
        fh.create_dataset("y", data=np.zeros((3, 1, 1, 1), np.uint8))
    with pytest.raises(SpecError, match=r"holds 3 labels but .* holds 4 patches"):
        open_dataset(section("pcam", root), "test")


def test_pcam_wrong_patch_shape_and_missing_file(tmp_path: Path) -> None:
    root = write_pcam(tmp_path, {"valid": 2})
    with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "w") as fh:
        fh.create_dataset("x", data=np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(SpecError, match=r"\(2, 64, 64, 3\) uint8; expected \(N, 96, 96, 3\)"):
        open_dataset(section("pcam", root), "val")
    with pytest.raises(SpecError, match=r"split_test_x\.h5: expected this PatchCamelyon file"):
        open_dataset(section("pcam", root), "test")


# ---------------------------------------------------------------------------------------------------- MHIST


def test_mhist_partitions_and_labels(tmp_path: Path) -> None:
    root = write_mhist(tmp_path, mhist_rows(n_train=8, n_test=4))
    data = section("mhist", root, val_fraction=0.25)
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))
    assert train.classes == ["HP", "SSA"]
    assert test.ids == [f"images/MHIST_{i:03d}.png" for i in range(8, 12)]
    assert test.targets.tolist() == [0, 1, 0, 1]
    assert val.class_counts() == {"HP": 1, "SSA": 1} and train.class_counts() == {"HP": 3, "SSA": 3}
    assert all(pixel_label(d, i) == d.targets[i] for d in (train, val, test) for i in range(len(d)))


def test_mhist_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = mhist_rows()
    root = write_mhist(tmp_path, rows)
    (root / "images" / "MHIST_002.png").unlink()
    with pytest.raises(SpecError, match=r"1 image.* listed in annotations\.csv are not in .*: MHIST_002"):
        open_dataset(section("mhist", root), "train")
    write_mhist(tmp_path, [*rows[:-1], ("MHIST_099.png", "TA", 0, "test")])
    with pytest.raises(SpecError, match="label 'TA'"):
        open_dataset(section("mhist", root), "test")
    write_mhist(tmp_path, [("MHIST_000.png", "SSA", 1, "test"), *rows[1:]])  # 1 of 7 votes, yet SSA
    open_dataset(section("mhist", root), "test")
    assert "1 row(s) whose majority label disagrees with the SSA vote count: MHIST_000.png" in \
        capsys.readouterr().err
    (root / "annotations.csv").write_text("name,label\nMHIST_000.png,HP\n")
    with pytest.raises(SpecError, match=r"missing column\(s\) \['Image Name', 'Majority Vote Label', "
                                        r"'Partition'\]"):
        open_dataset(section("mhist", root), "test")


# ----------------------------------------------------------------------------------------- ImageFolder, CSV


def write_folder(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("a", "b", "c")) -> Path:
    for split, n in splits.items():
        for label, name in enumerate(classes):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", label)
    return root


def test_folder_with_all_splits(tmp_path: Path) -> None:
    data = section("folder", write_folder(tmp_path, {"train": 3, "val": 2, "test": 1}))
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (9, 6, 3)
    assert train.classes == ["a", "b", "c"] and val.ids[0] == "val/a/0.png"
    assert all(pixel_label(d, i) == d.targets[i] for d in (train, val, test) for i in range(len(d)))


def test_folder_without_val_says_it_splits_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = section("folder", write_folder(tmp_path, {"train": 10}), val_fraction=0.3)
    train, val = open_dataset(data, "train"), open_dataset(data, "val")
    assert val.class_counts() == {"a": 3, "b": 3, "c": 3} and len(train) == 21
    assert "no val/ folder" in capsys.readouterr().err
    with pytest.raises(SpecError, match="has no test split"):
        open_dataset(data, "test")


def test_folder_missing_class_in_val_and_flat_layout(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", {"train": 2, "val": 1})
    shutil.rmtree(root / "val" / "b")
    with pytest.raises(SpecError, match=r"missing class folder\(s\) \['b'\]. Expected .*\['a', 'b', 'c'\]"):
        open_dataset(section("folder", root), "val")
    flat = write_folder(tmp_path / "flat", {"train": 1})
    with pytest.raises(SpecError, match="looks like a single ImageFolder of class folders"):
        open_dataset(section("folder", flat / "train"), "train")


def test_csv_with_and_without_split_column(tmp_path: Path) -> None:
    for i in range(12):
        write_image(tmp_path / "img" / f"{i}.png", i % 2)
    lines = [f"img/{i}.png,{'yes' if i % 2 else 'no'},{'test' if i >= 10 else 'train'}" for i in range(12)]
    (tmp_path / "with.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    data = section("csv", tmp_path / "with.csv", val_fraction=0.2)
    train, val, test = (open_dataset(data, s) for s in ("train", "val", "test"))
    assert test.ids == ["img/10.png", "img/11.png"] and train.classes == ["no", "yes"]
    assert val.class_counts() == {"no": 1, "yes": 1} and len(train) == 8
    assert all(pixel_label(d, i) == d.targets[i] for d in (train, val, test) for i in range(len(d)))
    unsplit = [line.rsplit(",", 1)[0] for line in lines]
    (tmp_path / "without.csv").write_text("path,label\n" + "\n".join(unsplit) + "\n")
    parts = [open_dataset(section("csv", tmp_path / "without.csv"), s).ids for s in ("train", "val", "test")]
    assert sorted(item for part in parts for item in part) == sorted(f"img/{i}.png" for i in range(12))


def test_csv_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "t.csv").write_text("path,label,split\na.png,x,train\nb.png,y,valid\n")
    with pytest.raises(SpecError, match=r"split 'valid'"):
        open_dataset(section("csv", tmp_path / "t.csv"), "train")
    (tmp_path / "t.csv").write_text("path,label\na.png,x\nmissing.png,y\n")
    with pytest.raises(SpecError, match=r"1 listed image.* not found .*: missing\.png"):
        open_dataset(section("csv", tmp_path / "t.csv"), "train")
    (tmp_path / "t.csv").write_text("path,label\na.png,x\na.png,y\n")
    with pytest.raises(SpecError, match=r"1 path\(s\) listed more than once: a\.png"):
        open_dataset(section("csv", tmp_path / "t.csv"), "train")
    (tmp_path / "t.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(SpecError, match=r"found columns \['file', 'class'\]; expected 'path', 'label'"):
        open_dataset(section("csv", tmp_path / "t.csv"), "train")


def test_layout_problems_collects_without_raising(tmp_path: Path) -> None:
    problems = section("crc", tmp_path).layout_problems()
    assert len(problems) == 2  # train/val share one problem (the training folder); test has its own
    assert all("expected the CRC" in p.message for p in problems)


# ---------------------------------------------------------------------------------------- splits, transform


def test_stratified_holdout_counts_and_order_independence() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, size=200)
    ids = [f"item{i:03d}" for i in range(200)]
    kept, held = stratified_holdout(ids, targets, list("abcd"), 0.15, seed=3, salt="val")
    for label in range(4):
        n = int((targets == label).sum())
        assert (targets[held] == label).sum() == min(max(int(np.floor(0.15 * n + 0.5)), 1), n - 1)
    assert sorted([*kept, *held]) == list(range(200))
    # Listing the same items in another order holds out the same items.
    order = rng.permutation(200)
    shuffled_ids = [ids[o] for o in order]
    _, held_shuffled = stratified_holdout(shuffled_ids, targets[order], list("abcd"), 0.15, 3, "val")
    assert {ids[o] for o in order[held_shuffled]} == {ids[h] for h in held}


def test_grouped_holdout_keeps_groups_whole() -> None:
    # 3 classes; items come in groups of 1-4 copies (as LC25000's rotated copies of one original).
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 5, size=90)
    groups = [f"g{g}" for g, n in enumerate(sizes) for _ in range(n)]
    targets = np.array([g % 3 for g, n in enumerate(sizes) for _ in range(n)])
    ids = [f"item{i:03d}" for i in range(len(groups))]
    kept, held = stratified_holdout(ids, targets, list("abc"), 0.3, seed=0, salt="test", groups=groups)
    assert sorted([*kept, *held]) == list(range(len(ids)))
    assert not {groups[i] for i in kept} & {groups[i] for i in held}  # no group on both sides
    for label in range(3):
        n = int((targets == label).sum())
        n_held = int((targets[held] == label).sum())
        assert 0.3 * n <= n_held < 0.3 * n + 4  # groups are taken until the target; the last one overshoots
    # The same groups are held out whatever the listing order.
    order = rng.permutation(len(ids))
    _, held2 = stratified_holdout([ids[o] for o in order], targets[order], list("abc"), 0.3, 0, "test",
                                  groups=[groups[o] for o in order])
    assert {ids[o] for o in order[held2]} == {ids[h] for h in held}


def test_csv_group_column_keeps_copies_on_one_side(tmp_path: Path) -> None:
    # 24 images in 8 groups of 3 (a group shares its label); every split must hold whole groups.
    for i in range(24):
        write_image(tmp_path / "img" / f"{i}.png", (i // 3) % 2)
    lines = [f"img/{i}.png,{'yes' if (i // 3) % 2 else 'no'},orig{i // 3}" for i in range(24)]
    lines[0] = "img/0.png,no,"  # an empty group cell: the row is its own group
    (tmp_path / "g.csv").write_text("path,label,group\n" + "\n".join(lines) + "\n")
    data = section("csv", tmp_path / "g.csv", test_fraction=0.25, val_fraction=0.25)
    parts = {s: open_dataset(data, s) for s in ("train", "val", "test")}
    group_of = {f"img/{i}.png": ("img/0.png" if i == 0 else f"orig{i // 3}") for i in range(24)}
    sides = {s: {group_of[item] for item in ds.ids} for s, ds in parts.items()}
    assert not sides["train"] & sides["test"] and not sides["val"] & sides["test"]
    assert not sides["train"] & sides["val"]
    assert sorted(item for ds in parts.values() for item in ds.ids) == sorted(group_of)
    assert all(ds.class_counts()["no"] > 0 and ds.class_counts()["yes"] > 0 for ds in parts.values())


def test_eval_transform_resize_crop_and_normalise() -> None:
    # 40×80 image: left quarter red, middle half grey, right quarter blue. Resizing the shorter side to 20
    # gives 20×40, and the centre crop keeps exactly the grey middle half.
    image = np.full((40, 80, 3), 100, np.uint8)
    image[:, :20] = (255, 0, 0)
    image[:, 60:] = (0, 0, 255)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    out = eval_transform(20, mean, std)(image)
    expected = (100 / 255 - np.array(mean)) / np.array(std)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 2:-2, 2:-2].mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    squashed = eval_transform(20, mean, std, crop="none")(image)
    assert squashed.shape == (3, 20, 20) and squashed[0, 10, 0] > squashed[0, 10, 10]  # red border kept
    enlarged = eval_transform(64, (0, 0, 0), (1, 1, 1))(np.full((8, 8, 3), 51, np.uint8))
    np.testing.assert_allclose(enlarged.numpy(), 0.2, atol=1e-6)
