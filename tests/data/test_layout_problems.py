"""A spec's dataset problems are reported under the field that causes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathssl_cli.errors import SpecError
from pathssl_cli.specs import load_spec
from pathssl_cli.synthetic import write_image_folder


def _knn_spec(folder: Path, root: Path, subset: Path, split_seed: int = 0) -> Path:
    path = folder / "knn.toml"
    path.write_text(f'kind = "knn"\n[data]\ndataset = "folder"\nroot = "{root}"\ntrain_subset = "{subset}"\n'
                    f'split_seed = {split_seed}\n[model]\nbackbone = "resnet_tiny"\n[run]\noutput_dir = "out"\n')
    return path


def test_train_subset_problems_are_reported_under_data_train_subset(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", n_per_class=4, size=32, seed=0, splits=("train", "test"))
    hand = tmp_path / "hand.csv"
    hand.write_text("id,label\ntrain/nowhere.png,tumour\n")
    with pytest.raises(SpecError) as info:
        load_spec(_knn_spec(tmp_path, root, hand))
    (problem,) = info.value.problems
    assert problem.where.endswith("data.train_subset") and "not in the train split" in problem.message
    # A bad root is still the root's problem (and the subset is not blamed for it).
    with pytest.raises(SpecError) as info:
        load_spec(_knn_spec(tmp_path, tmp_path, hand))
    assert {p.where.rpartition(": ")[2] for p in info.value.problems} == {"data.root"}
    # A missing subset file is reported once, as a missing file.
    with pytest.raises(SpecError) as info:
        load_spec(_knn_spec(tmp_path, root, tmp_path / "absent.csv"))
    (problem,) = info.value.problems
    assert problem.where.endswith("data.train_subset") and "file not found" in problem.message
