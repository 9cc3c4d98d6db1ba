"""`pathssl subsample`: per-class counts, nesting, determinism, refusal, subset files, and the CLI."""

from __future__ import annotations

import itertools
import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.data.benchmarks import open_dataset
from pathssl_cli.data.subset_files import read_subset, read_subset_indices, read_subset_rows, subset_metadata
from pathssl_cli.data.subsets import minimum_fraction, nested_subsets, subset_file_name
from pathssl_cli.errors import SpecError
from pathssl_cli.specs import load_spec, spec_model
from pathssl_cli.specs.data import DataSection
from pathssl_cli.specs.subsample import SubsampleSpec
from pathssl_cli.specs.toml_files import load_with_extends
from pathssl_cli.synthetic import write_image_folder


def expected_count(fraction: float, n: int) -> int:
    """Reference: round(fraction × n), half up, in decimal arithmetic on the fraction as written."""
    return int((Decimal(str(fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def make_items(sizes: list[int]) -> tuple[list[str], np.ndarray, list[str]]:
    targets = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    ids = [f"c{t}/item{i:04d}" for i, t in enumerate(targets)]
    return ids, targets, [f"class{k}" for k in range(len(sizes))]


def test_counts_per_class_follow_the_rounding_rule() -> None:
    sizes = [100, 37, 15, 3, 250]
    ids, targets, classes = make_items(sizes)
    fractions = [0.2, 0.29, 0.5, 0.7, 1.0]
    subsets = nested_subsets(ids, targets, classes, fractions, seed=0)
    for fraction, kept in subsets.items():
        per_class = np.bincount(targets[kept], minlength=len(sizes))
        assert per_class.tolist() == [expected_count(fraction, n) for n in sizes]
        assert len(set(kept.tolist())) == len(kept)  # no item twice
    assert expected_count(0.29, 100) == 29 and expected_count(0.5, 15) == 8  # float traps: 28.99…, half up
    assert subsets[1.0].tolist() == list(range(len(ids)))


def test_subsets_are_nested_and_deterministic() -> None:
    ids, targets, classes = make_items([400, 120, 55])
    fractions = [0.01, 0.05, 0.1, 0.5, 1.0]
    first = nested_subsets(ids, targets, classes, fractions, seed=7)
    again = nested_subsets(ids, targets, classes, fractions, seed=7)
    other = nested_subsets(ids, targets, classes, fractions, seed=8)
    for small, large in itertools.pairwise(fractions):
        assert set(first[small].tolist()) < set(first[large].tolist())
    assert all(np.array_equal(first[f], again[f]) for f in fractions)
    assert not np.array_equal(first[0.1], other[0.1])
    # Asking for one fraction alone gives the same set as asking for it among others.
    alone = nested_subsets(ids, targets, classes, [0.1], seed=7)
    assert np.array_equal(alone[0.1], first[0.1])


def test_subsets_do_not_depend_on_listing_order() -> None:
    ids, targets, classes = make_items([60, 40])
    order = np.random.default_rng(1).permutation(len(ids))
    chosen = nested_subsets(ids, targets, classes, [0.25], seed=3)[0.25]
    shuffled = nested_subsets([ids[o] for o in order], targets[order], classes, [0.25], seed=3)[0.25]
    assert {ids[i] for i in chosen} == {ids[order[i]] for i in shuffled}


def test_subset_is_spread_over_the_class_not_its_first_items() -> None:
    ids, targets, classes = make_items([1000])
    kept = nested_subsets(ids, targets, classes, [0.1], seed=0)[0.1]
    assert 300 < kept.mean() < 700 and kept.max() > 900  # a prefix would sit in [0, 100)


def test_refuses_a_fraction_that_empties_a_class_and_says_the_minimum() -> None:
    ids, targets, classes = make_items([1000, 10, 40])
    with pytest.raises(SpecError) as error:
        nested_subsets(ids, targets, classes, [0.01, 0.1], seed=0)
    message = str(error.value)
    assert "fraction 0.01 would keep no item of class(es) class1" in message
    assert "use fractions ≥ 0.05" in message and "fraction 0.1" not in message
    # The announced minimum really is the smallest that works: 1 / (2 × 10).
    assert minimum_fraction(10) == 0.05
    assert np.bincount(targets[nested_subsets(ids, targets, classes, [0.05], 0)[0.05]]).min() == 1
    with pytest.raises(SpecError):
        nested_subsets(ids, targets, classes, [0.0499], seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_at_least_one_per_class_for_any_allowed_fraction(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 300, size=6).tolist()
    ids, targets, classes = make_items(sizes)
    fraction = minimum_fraction(min(sizes))
    kept = nested_subsets(ids, targets, classes, [fraction, 1.0], seed)[fraction]
    assert np.bincount(targets[kept], minlength=6).min() >= 1


def test_file_names() -> None:
    assert [subset_file_name(f) for f in (0.01, 0.1, 1.0, 0.005, 0.125)] == [
        "subset_1pct.csv", "subset_10pct.csv", "subset_100pct.csv", "subset_0.5pct.csv", "subset_12.5pct.csv"]


# ------------------------------------------------------------------------------------------- command, files


def write_spec(path: Path, body: str) -> Path:
    path.write_text('kind = "subsample"\n' + body)
    return path


def test_cli_writes_nested_files_usable_as_train_subset(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", n_per_class=20, size=32, seed=0, splits=("train", "val"))
    spec = write_spec(tmp_path / "sub.toml", f"""
[data]
dataset = "folder"
root = "{root}"
[subsample]
fractions = [1.0, 0.1, 0.5]
seed = 4
[run]
output_dir = "out"
""")
    result = CliRunner().invoke(cli, ["subsample", str(spec)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    summary = json.loads((out / "subsets.json").read_text())
    assert summary["subsets"]["0.1"]["per_class"] == {name: 2 for name in summary["classes"]}
    ten, fifty, full = (set(read_subset(out / subset_file_name(f))) for f in (0.1, 0.5, 1.0))
    assert ten < fifty < full and len(full) == 20 * len(summary["classes"])
    meta = subset_metadata(out / "subset_10pct.csv")
    assert meta["fraction"] == 0.1 and meta["seed"] == 4 and meta["source"]["dataset"] == "folder"
    # The file narrows the train split of an evaluation with the same [data] to exactly its items.
    data = DataSection(dataset="folder", root=root, train_subset=out / "subset_10pct.csv")
    train = open_dataset(data, "train")
    assert set(train.ids) == ten and len(open_dataset(data, "val")) == 20 * len(summary["classes"])
    labels = dict(read_subset_rows(out / "subset_10pct.csv"))
    assert all(labels[i] == train.classes[t] for i, t in zip(train.ids, train.targets, strict=True))


def test_cli_refusal_exits_2_before_writing(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", n_per_class=5, size=32, seed=0, splits=("train",))
    spec = write_spec(tmp_path / "sub.toml", f"""
[data]
dataset = "folder"
root = "{root}"
val_fraction = 0.2
[subsample]
fractions = [0.01]
[run]
output_dir = "out"
""")
    result = CliRunner().invoke(cli, ["subsample", str(spec)])
    assert result.exit_code == 2
    # 5 per class minus 1 for val leaves 4: the smallest working fraction is 1 / 8.
    assert "would keep no item" in result.output and "fractions ≥ 0.125" in result.output
    assert not (tmp_path / "out").exists()


def test_subset_from_other_split_settings_is_refused(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", n_per_class=10, size=32, seed=0, splits=("train",))
    spec = write_spec(tmp_path / "sub.toml", f"""
[data]
dataset = "folder"
root = "{root}"
[run]
output_dir = "out"
""")
    result = CliRunner().invoke(cli, ["subsample", str(spec), "--set", "subsample.fractions=[0.5]"])
    assert result.exit_code == 0, result.output
    subset = tmp_path / "out" / "subset_50pct.csv"
    data = DataSection(dataset="folder", root=root, split_seed=1, train_subset=subset)
    with pytest.raises(SpecError, match="split_seed = 0 in the file, 1 in this spec"):
        open_dataset(data, "train")
    (tmp_path / "hand.csv").write_text("id,label\ntrain/nowhere.png,tumour\n")
    with pytest.raises(SpecError, match="1 of its 1 ids are not in the train split"):
        hand = data.model_copy(update={"train_subset": tmp_path / "hand.csv", "split_seed": 0})
        open_dataset(hand, "train")


def test_spec_needs_exactly_one_source(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.toml", '[run]\noutput_dir = "o"\n')
    with pytest.raises(SpecError, match="give exactly one source"):
        load_spec(spec)
    spec = write_spec(tmp_path / "s.toml", '[subsample]\nfractions = [0, 1.5]\n[images]\nformat = "consep"\n'
                      f'root = "{tmp_path}"\n[run]\noutput_dir = "o"\n')
    with pytest.raises(SpecError, match=r"fractions must lie in \(0, 1\]"):
        load_spec(spec)


def test_consep_images_at_image_level(shared_data: Path, tmp_path: Path) -> None:
    consep = shared_data / "nuclei" / "consep-tiles"
    spec = write_spec(tmp_path / "s.toml", f'[images]\nformat = "consep"\nroot = "{consep}"\n'
                      '[subsample]\nfractions = [0.1, 0.5]\n[run]\noutput_dir = "out"\n')
    result = CliRunner().invoke(cli, ["subsample", str(spec)])
    assert result.exit_code == 0, result.output
    stems = {p.stem for p in (consep / "Images").glob("*.png")}
    ten, half = (read_subset(tmp_path / "out" / name) for name in ("subset_10pct.csv", "subset_50pct.csv"))
    assert len(ten) == expected_count(0.1, len(stems)) and len(half) == expected_count(0.5, len(stems))
    assert set(ten) < set(half) <= stems


def test_pannuke_fold_stratified_by_tissue(tmp_path: Path) -> None:
    tissues = np.array(["Breast"] * 30 + ["Colon"] * 12 + ["Kidney"] * 4)
    tissues = tissues[np.random.default_rng(0).permutation(46)]
    (tmp_path / "Fold 1" / "images" / "fold1").mkdir(parents=True)
    np.save(tmp_path / "Fold 1" / "images" / "fold1" / "types.npy", tissues)  # the release's nesting
    spec = write_spec(tmp_path / "s.toml", '[images]\nformat = "pannuke"\nroot = "Fold 1"\n'
                      '[subsample]\nfractions = [0.25]\n[run]\noutput_dir = "out"\n')
    result = CliRunner().invoke(cli, ["subsample", str(spec)])
    assert result.exit_code == 0, result.output
    indices = read_subset_indices(tmp_path / "out" / "subset_25pct.csv")
    kept = dict(zip(*np.unique(tissues[indices], return_counts=True), strict=True))
    assert kept == {"Breast": 8, "Colon": 3, "Kidney": 1}  # round-half-up of 7.5, 3 and 1
    labels = dict(read_subset_rows(tmp_path / "out" / "subset_25pct.csv"))
    assert labels[str(indices[0])] == tissues[indices[0]]


# ---------------------------------------------------------------------------------------------- shipped specs

SPECS = Path(__file__).resolve().parents[2] / "specs" / "subsample"


@pytest.mark.parametrize("path", sorted(SPECS.glob("*_low_label.toml")), ids=lambda p: p.name)
def test_shipped_specs_follow_the_evaluation_convention(path: Path) -> None:
    # The datasets are not in the repository, so the schema is validated and the paths checked against the
    # convention that specs/evaluate/*_{1,10}pct.toml rely on (runs/subsets/<name>/subset_<pct>pct.csv).
    data, _ = load_with_extends(path)
    spec = spec_model("subsample").model_validate(data)
    name = path.stem.removesuffix("_low_label")
    assert isinstance(spec, SubsampleSpec)
    if spec.data is not None:
        assert spec.data.dataset == name and Path(spec.data.root) == Path("../../data") / name
        assert {0.01, 0.1} <= set(spec.subsample.fractions)
        assert Path(spec.run.output_dir) == Path("../../runs/subsets") / name
    else:
        assert spec.images is not None and spec.images.format == name


def test_tiny_spec_runs_on_an_image_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", n_per_class=8, size=32, seed=1, splits=("train", "val"))
    out = tmp_path / "subsets"
    result = CliRunner().invoke(cli, ["subsample", str(SPECS / "tiny.toml"), "--set", f"data.root={root}",
                                      "--set", f"run.output_dir={out}"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in sorted(out.glob("subset_*.csv"))] == [
        "subset_100pct.csv", "subset_25pct.csv", "subset_50pct.csv"]
    classes = json.loads((out / "subsets.json").read_text())["classes"]
    assert len(read_subset(out / "subset_25pct.csv")) == 2 * len(classes)  # round(0.25 × 8) per class


def test_image_source_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "CoNSeP" / "Train").mkdir(parents=True)
    spec = write_spec(tmp_path / "s.toml", '[images]\nformat = "consep"\nroot = "CoNSeP"\n'
                      '[run]\noutput_dir = "o"\n')
    with pytest.raises(SpecError, match=r"CoNSeP/Images: expected the CoNSeP Images/ folder.*holds: Train/"):
        load_spec(spec)
    np.save(tmp_path / "types.npy", np.array([{"tissue": "Breast"}], dtype=object), allow_pickle=True)
    spec = write_spec(tmp_path / "s.toml", '[images]\nformat = "pannuke"\nroot = "types.npy"\n'
                      '[run]\noutput_dir = "o"\n')
    with pytest.raises(SpecError, match="holds Python objects"):
        load_spec(spec)
    (tmp_path / "subset.csv").write_text("id,label\nimage_1,image\nimage_1,image\n")
    with pytest.raises(SpecError, match="ids repeat"):
        read_subset(tmp_path / "subset.csv")
    (tmp_path / "subset.csv").write_text("id,label\ntrain/a.png,x\n")
    with pytest.raises(SpecError, match="not array indices; this is not a PanNuke subset"):
        read_subset_indices(tmp_path / "subset.csv")
