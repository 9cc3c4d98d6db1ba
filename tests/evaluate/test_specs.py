"""Every spec in specs/evaluate validates.

Decision: the paper-scale specs point at datasets (data/bach, ...) and subset files (runs/subsets/...) that
are not in the repository, and `load_spec` rightly refuses missing inputs and wrong layouts. Faking four
official layouts here would duplicate the dataset tests, so those specs are validated for their schema (after
`extends` is merged, through the same pydantic models), and their paths are checked to follow the documented
convention. The tiny specs, which run on any ImageFolder, go through the full `load_spec` with path and layout
checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pathssl_cli.specs import load_spec, spec_model
from pathssl_cli.specs.toml_files import load_with_extends

SPECS = Path(__file__).resolve().parents[2] / "specs" / "evaluate"
ALL = sorted(SPECS.glob("*.toml"))
TINY = [p for p in ALL if p.name.startswith(("tiny_", "cpu_real_"))]  # CPU-sized: fully valid on tiny inputs


def test_the_grid_is_complete() -> None:
    names = {p.stem for p in ALL}
    for dataset in ("bach", "crc", "pcam", "mhist"):
        for protocol in ("linear", "finetune", "knn", "linear_eva"):
            assert f"{dataset}_{protocol}" in names
        for protocol in ("linear", "finetune"):
            for pct in (1, 10):
                assert f"{dataset}_{protocol}_{pct}pct" in names


@pytest.mark.parametrize("path", [p for p in ALL if p not in TINY], ids=lambda p: p.name)
def test_paper_scale_schema_valid(path: Path) -> None:
    data, _ = load_with_extends(path)
    spec = spec_model(data["kind"]).model_validate(data)
    assert spec.kind in ("linear", "finetune", "knn")
    dataset = spec.data.dataset  # type: ignore[attr-defined]
    assert path.stem.startswith(dataset)
    assert Path(spec.data.root) == Path("../../data") / dataset  # type: ignore[attr-defined]
    assert Path(spec.run.output_dir) == Path("../../runs/eval") / path.stem  # type: ignore[attr-defined]
    subset = spec.data.train_subset  # type: ignore[attr-defined]
    if path.stem.endswith("pct"):
        pct = path.stem.rsplit("_", 1)[1]
        assert subset == Path(f"../../runs/subsets/{dataset}/subset_{pct}.csv")
    else:
        assert subset is None


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.name)
def test_tiny_specs_fully_valid(path: Path, tiny_folder: Path, tiny_weights: Path) -> None:
    spec = load_spec(path, [f"data.root={tiny_folder}", f"model.weights={tiny_weights}"])
    assert spec.model.backbone == "resnet_tiny"  # type: ignore[attr-defined]
    assert spec.run.device == "cpu"  # type: ignore[attr-defined]
