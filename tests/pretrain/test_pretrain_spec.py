"""Every spec of specs/pretrain validates; cross-field checks fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathssl_cli.errors import SpecError
from pathssl_cli.specs import load_spec
from pathssl_cli.specs.pretrain import PretrainSpec

SPECS = Path(__file__).resolve().parents[2] / "specs" / "pretrain"

ALL_SPECS = sorted(p for p in SPECS.glob("*.toml") if not p.name.startswith("_"))


def test_the_paper_grid_and_tiny_specs_are_all_there() -> None:
    names = {p.stem for p in ALL_SPECS}
    for method in ("mocov2", "swav", "barlow_twins", "dino", "dinov2"):
        assert f"tiny_{method}" in names
    assert "dinov2_vit_base_patch14_reg4" in names
    for backbone_method in ("mocov2_resnet50", "swav_resnet50", "barlow_twins_resnet50",
                            "dino_vit_small_patch16", "dino_vit_small_patch8", "dinov2_vit_small_patch16"):
        assert {f"{backbone_method}_original", f"{backbone_method}_pathology"} <= names


@pytest.fixture(scope="module")
def slide_list(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slide CSV (its slides need not exist to validate a spec: they are per-slide problems at run time)."""
    path = tmp_path_factory.mktemp("slides") / "slides.csv"
    path.write_text("path\nslide.svs\n")
    return path


def _sources(path: Path, image_folder: Path, slide_list: Path) -> list[str]:
    if path.stem.endswith("_slides"):
        return [f'data.slides=["{slide_list}"]']
    return [f'data.tiles=["{image_folder}"]']


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_spec_validates(path: Path, image_folder: Path, slide_list: Path) -> None:
    spec = load_spec(path, _sources(path, image_folder, slide_list), kind="pretrain")
    assert isinstance(spec, PretrainSpec)
    n_global, n_local = (getattr(spec.method, "n_global_crops", 2), getattr(spec.method, "n_local_crops", 0))
    recipe = spec.augment.recipe(spec.method.name, n_global, n_local)
    assert recipe.n_global == n_global and recipe.n_local == n_local
    if spec.augment.preset == "pathology":
        assert recipe.vflip > 0 and recipe.stain.p > 0
    else:
        assert recipe.vflip == 0 and recipe.stain.p == 0


def test_original_and_pathology_variants_differ_only_in_the_techniques() -> None:
    originals = sorted(SPECS.glob("*_original.toml"))
    assert len(originals) == 6
    for original in originals:
        pathology = original.with_name(original.name.replace("_original", "_pathology"))
        tiles = [f'data.tiles=["{SPECS}"]']
        a, b = load_spec(original, tiles), load_spec(pathology, tiles)
        ignore = {"augment": True, "run": {"output_dir"}, "data": {"mpp_weights"}}
        assert a.model_dump(exclude=ignore) == b.model_dump(exclude=ignore), original.name
        assert (a.augment.preset, b.augment.preset) == ("original", "pathology")
        assert len(b.data.mpp_weights) == 2 and len(a.data.mpp_weights) == 1  # multi-FoV only in pathology


def test_slide_variants_differ_from_the_paper_specs_only_in_their_data(image_folder: Path,
                                                                         slide_list: Path) -> None:
    """Issue 23: every paper spec has a `_slides` twin whose fields of view are the twin's mpp_weights."""
    variants = sorted([*SPECS.glob("*_original_slides.toml"), *SPECS.glob("*_pathology_slides.toml")])
    assert len(variants) == 10
    for variant in variants:
        twin = variant.with_name(variant.name.replace("_slides", ""))
        a = load_spec(twin, [f'data.tiles=["{image_folder}"]'])
        b = load_spec(variant, [f'data.slides=["{slide_list}"]'])
        ignore = {"run": {"output_dir"}, "data": True}
        assert a.model_dump(exclude=ignore) == b.model_dump(exclude=ignore), variant.name
        assert b.data.tiles == [] and b.data.mpp == a.data.mpp_weights  # type: ignore[attr-defined]
        assert b.data.tile_size == 224 and a.data.batch_size == b.data.batch_size


@pytest.mark.parametrize(("override", "expected"), [
    (["data.tiles=[]"], "give data.tiles"),
    (["data.mpp=[0.5]"], "there are no data.slides"),
    (["data.tiles=[]", "data.slides=['SLIDES']", 'data.mpp_weights={"0.5"=1.0}'], "there are no data.tiles"),
    (["data.slides=['SLIDES']", 'data.mpp={"big"=1.0}'], "not a number of µm/px"),
    (["data.slides=['SLIDES']", "data.mpp=['3x']"], "unknown magnification"),
    (["data.slides=['SLIDES']", "data.mpp={log_uniform=[2.0, 0.5]}"], "low <= high"),
    (["data.slides=['/nowhere/*.svs']"], "no slide matched"),
    (["data.slides=['/nowhere/a.svs']"], "file not found"),
])
def test_slide_settings_are_checked(override: list[str], expected: str, image_folder: Path,
                                    slide_list: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(SPECS / "tiny_mocov2.toml", [f'data.tiles=["{image_folder}"]',
                                               *(o.replace("SLIDES", str(slide_list)) for o in override)])
    assert expected in str(info.value)


def test_slide_fields_of_view_in_every_form(slide_list: Path) -> None:
    def sampling(value: str):  # type: ignore[no-untyped-def]
        spec = load_spec(SPECS / "tiny_mocov2.toml", ["data.tiles=[]", f'data.slides=["{slide_list}"]',
                                                       f"data.mpp={value}"])
        return spec.data.mpp_sampling()  # type: ignore[attr-defined]

    assert sampling("['40x', 0.5]").values == (0.25, 0.5)
    weighted = sampling('{"1.0" = 1.0, "0.25" = 3.0}')
    assert weighted.values == (0.25, 1.0) and weighted.weights == (3.0, 1.0)
    ranged = sampling("{log_uniform = [0.25, 2.0]}")
    assert ranged.log_uniform == (0.25, 2.0)
    # E[mpp²] of log-uniform on [a, b], worked out by hand: (b² - a²) / (2 ln(b / a))
    assert ranged.expected_square() == pytest.approx((4.0 - 0.0625) / (2 * 2.0794415416798357))


def test_paper_grid_follows_the_paper(image_folder: Path) -> None:
    tiles = [f'data.tiles=["{image_folder}"]']
    dino8 = load_spec(SPECS / "dino_vit_small_patch8_pathology.toml", tiles)
    assert dino8.model.backbone == "vit_small_patch8_224" and dino8.method.name == "dino"
    dino16 = load_spec(SPECS / "dino_vit_small_patch16_original.toml", tiles)
    # dino main_dino.py --drop_path_rate 0.1 for ViT-S; the teacher (exported) never drops
    assert dino8.model.drop_path_rate == dino16.model.drop_path_rate == pytest.approx(0.1)
    assert dino8.method.export == dino16.method.export == "teacher"  # type: ignore[union-attr]
    bt = load_spec(SPECS / "barlow_twins_resnet50_pathology.toml", tiles)
    assert bt.model.backbone == "resnet50" and bt.optim.name == "lars"
    assert bt.method.lambd == pytest.approx(0.0051)  # type: ignore[union-attr]
    assert bt.optim.no_decay_lr_scale == pytest.approx(0.0048 / 0.2)
    assert bt.model.drop_path_rate == 0.0


def test_dinov2_specs_follow_the_official_config(image_folder: Path) -> None:
    tiles = [f'data.tiles=["{image_folder}"]']
    small = load_spec(SPECS / "dinov2_vit_small_patch16_pathology.toml", tiles)
    method = small.method
    assert method.name == "dinov2" and small.model.backbone == "vit_small_patch16_dinov2"
    assert (method.dino.koleo_loss_weight, method.ibot.mask_sample_probability) == (0.1, 0.5)  # type: ignore[union-attr]
    assert method.ibot.mask_ratio_min_max == (0.1, 0.5) and method.n_local_crops == 8  # type: ignore[union-attr]
    assert small.optim.peak_lr(2048) == pytest.approx(0.004 * 2 ** 0.5)  # sqrt_wrt_1024
    assert small.optim.peak_lr(2048) * small.optim.final_lr_fraction == pytest.approx(1e-6, rel=1e-3)
    # 100 dinov2 epochs of 1250 iterations at 2048 images = Kang et al.'s 200 ImageNet epochs
    assert small.run.epoch_images // small.data.batch_size == 1250 and small.run.epochs == 100
    recipe = small.augment.recipe("dinov2", 2, 8)
    assert recipe.global_scale == (0.32, 1.0) and recipe.local_scale == (0.05, 0.32) and recipe.local_size == 96
    assert recipe.blur_p == [0.0, 0.9] and recipe.blur_kernel == 9  # as dinov2's inverted RandomApply blurs
    base = load_spec(SPECS / "dinov2_vit_base_patch14_reg4.toml", tiles)
    assert base.model.backbone == "vit_base_patch14_reg4_dinov2" and base.augment.local_size == 98
    assert base.run.epochs * base.run.epoch_images // base.data.batch_size == 125_000  # UNI: 125k iterations
    assert base.optim.peak_lr(3072) * base.optim.final_lr_fraction == pytest.approx(1e-6, rel=1e-3)
    with pytest.raises(SpecError, match="not a ViT: dinov2 masks patch tokens"):
        load_spec(SPECS / "tiny_dinov2.toml", [*tiles, "model.backbone=resnet_tiny"])


@pytest.mark.parametrize(("override", "expected"), [
    (["run.epochs=2"], "exactly one of run.epochs and run.steps"),
    (["augment.overrides={vflip=2.0}"], "vflip"),
    (["augment.overrides={n_local=4}"], "the number of views is the method's"),
    (["method.name=simclr"], "method"),
    (['data.mpp_weights={"abc"=1.0}'], "not a number"),
    (["optim.name=adam"], "optim.name"),
])
def test_invalid_settings_are_reported(override: list[str], expected: str, image_folder: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(SPECS / "tiny_mocov2.toml", [f'data.tiles=["{image_folder}"]', *override])
    assert expected in str(info.value)


def test_global_batch_must_split_over_the_world(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SpecError, match="cannot be split evenly over 3"):
        load_spec(SPECS / "tiny_mocov2.toml", [f'data.tiles=["{image_folder}"]', "data.batch_size=32"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    load_spec(SPECS / "tiny_mocov2.toml", [f'data.tiles=["{image_folder}"]', "data.batch_size=32"])
