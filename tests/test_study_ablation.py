"""specs/study/cpu_real_ablation.toml (issue 21 §4), validated, not run: the grid it plans, that each arm is the
CPU recipe with exactly its technique added (the pathology preset's values), that its probes fit the recipe's
backbone, and that its slide-grouped csv is the shared dev set's manifest with group = slide."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from pathssl_cli.specs import load_spec

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "specs" / "study" / "cpu_real_ablation.toml"
HERE = STUDY.with_suffix("")  # specs/study/cpu_real_ablation/: its helper specs and csv
RECIPE = ROOT / "specs" / "pretrain" / "cpu_real.toml"
TILE = ROOT / "specs" / "tile" / "cpu_real.toml"
TECHNIQUES = {"vflip": {"vflip"}, "randstainna": {"stain"},
              "weak_jitter": {"brightness", "contrast", "saturation", "hue"}}
#: What the study itself sets on a pre-training (seed, directory, resume, length) or an arm varies.
ARM_FIELDS = {("run", "seed"), ("run", "output_dir"), ("run", "resume"), ("run", "steps"), ("augment", "preset"),
              ("augment", "overrides"), ("data", "tiles")}


@pytest.fixture(scope="module")
def plan() -> Any:
    from pathssl_cli.study import build_plan

    found = build_plan(load_spec(STUDY, check_inputs=False))
    assert not found.problems, found.problems
    return found


def recipe_of(spec: Any) -> Any:
    return spec.augment.recipe(spec.method.name, 2, 0)


def differing(a: Any, b: Any) -> set[str]:
    return {name for name in type(a).model_fields if getattr(a, name) != getattr(b, name)}


def test_the_grid(plan: Any) -> None:
    spec = plan.spec
    assert [p.name for p in spec.pretrains] == ["original", "vflip", "randstainna", "weak_jitter", "two_fov",
                                               "pathology"]
    assert len(spec.study.seeds) >= 3 and spec.study.folds == 5 and spec.tables.reference == "original"
    pretraining = plan.stage("pretrain")
    assert len(pretraining) == 6 * len(spec.study.seeds)
    # 7 rows (6 pre-trained + random init) × seeds × 5 slide folds × (linear, kNN); every run is on a fold.
    evaluations = plan.stage("evaluate")
    assert len(evaluations) == 7 * len(spec.study.seeds) * 5 * 2
    assert {r.fold for r in evaluations} == set(range(5)) and {r.entry for r in evaluations} == {"linear", "knn"}
    assert {r.backbone for r in evaluations} == {"random", *[p.name for p in spec.pretrains]}


def test_each_arm_adds_exactly_its_technique_to_the_recipe(plan: Any) -> None:
    recipe = load_spec(RECIPE, check_inputs=False)
    arms = {run.name.split("/")[1].split("__")[0]: run.load(check_inputs=False)
            for run in plan.stage("pretrain") if run.seed == plan.spec.study.seeds[0]}
    original, pathology = recipe_of(arms["original"]), recipe_of(arms["pathology"])
    assert original == recipe_of(load_spec(RECIPE, ["augment.preset='original'"], check_inputs=False))
    assert differing(pathology, original) == set().union(*TECHNIQUES.values())
    for name, fields in TECHNIQUES.items():
        view = recipe_of(arms[name])
        assert differing(view, original) == fields, name
        assert all(getattr(view, f) == getattr(pathology, f) for f in fields), name  # the preset's values
    assert recipe_of(arms["two_fov"]) == original

    # Fields of view: the recipe's store (two µm/px levels) for two_fov and pathology, the same store tiled at
    # its first level alone for the others; every other source is the recipe's.
    tile, one_fov = load_spec(TILE, check_inputs=False), load_spec(HERE / "tile_one_fov.toml", check_inputs=False)
    assert len(tile.tiles.mpp) == 2 and one_fov.tiles.mpp == tile.tiles.mpp[:1]
    assert tile.model_dump(exclude={"tiles": {"mpp"}, "output": {"dir"}}) == one_fov.model_dump(
        exclude={"tiles": {"mpp"}, "output": {"dir"}})
    store = recipe.data.tiles.index(tile.output.dir)
    swapped = [one_fov.output.dir if i == store else p for i, p in enumerate(recipe.data.tiles)]
    for name, arm in arms.items():
        assert arm.data.tiles == (recipe.data.tiles if name in ("two_fov", "pathology") else swapped), name
        # Nothing else differs from the recipe: not its method, optimiser, sizes, batch, or length per step.
        assert _without(arm.model_dump(), ARM_FIELDS) == _without(recipe.model_dump(), ARM_FIELDS), name
        assert arm.run.steps == recipe.run.steps  # the recipe as shipped, at its full length


def _without(dump: dict[str, Any], fields: set[tuple[str, str]]) -> dict[str, Any]:
    return {section: ({k: v for k, v in values.items() if (section, k) not in fields}
                      if isinstance(values, dict) else values) for section, values in dump.items()}


def test_the_probes_read_the_recipes_backbone_on_slide_folds(plan: Any) -> None:
    recipe = load_spec(RECIPE, check_inputs=False)
    linear = next(r for r in plan.stage("evaluate") if r.entry == "linear").load(check_inputs=False)
    knn = next(r for r in plan.stage("evaluate") if r.entry == "knn").load(check_inputs=False)
    probes = {"linear": load_spec(ROOT / "specs" / "evaluate" / "cpu_real_linear.toml", check_inputs=False),
              "knn": load_spec(ROOT / "specs" / "evaluate" / "cpu_real_knn.toml", check_inputs=False)}
    for spec, own in ((linear, probes["linear"]), (knn, probes["knn"])):
        assert spec.model.backbone == own.model.backbone == recipe.model.backbone
        # the recipe's own probes, only the data and where results go differ
        assert spec.model_dump(exclude={"data", "run", "source_file"}) == own.model_dump(
            exclude={"data", "run", "source_file"})
        assert spec.data.dataset == "csv" and spec.data.root == HERE / "kather2016_dev_slides.csv"
        assert spec.data.folds == 5
    assert linear.probe.kind == "lbfgs" and linear.features.normalize and linear.optim.select_by == "balanced_acc"
    assert linear.features.recipe == knn.features.recipe == "stages"
    assert all(r.deterministic for r in plan.stage("evaluate"))  # the seeds of a pre-training are its replicates


def test_the_slide_csv_is_the_dev_manifest_grouped_by_slide(shared_data: Path) -> None:
    folder = shared_data / "patches" / "kather2016-dev"
    with (folder / "manifest.csv").open(newline="") as fh:
        manifest = {row["path"]: row for row in csv.DictReader(fh)}
    table = HERE / "kather2016_dev_slides.csv"
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(manifest) == 1654
    for row in rows:
        path = (table.parent / row["path"]).resolve()
        assert path.is_file(), row["path"]
        original = manifest[str(path.relative_to(folder.resolve()))]
        assert (row["label"], row["group"]) == (original["label"], original["slide"])
    assert len({row["group"] for row in rows}) == 5
