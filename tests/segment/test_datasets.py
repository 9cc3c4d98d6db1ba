"""Nuclei dataset loaders (PanNuke, CoNSeP, generic, subsets) and HoVer-Net patches."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from pathssl_cli.errors import SpecError
from pathssl_cli.segment.datasets import (
    ConsepFolder,
    GenericFolder,
    PanNukeFold,
    Subset,
    pannuke_mask_to_maps,
    read_subset_ids,
)
from pathssl_cli.segment.hovernet import build_hovernet
from pathssl_cli.segment.losses import hovernet_loss
from pathssl_cli.segment.patches import AugmentConfig, HoVerNetPatches
from pathssl_cli.segment.targets import hv_map


# ---------------------------------------------------------------------------------------------- PanNuke
def _write_pannuke_fold(root: Path, n: int = 3, size: int = 32) -> np.ndarray:
    """Official nesting: images/fold1/images.npy (float64), masks/fold1/masks.npy, images/fold1/types.npy."""
    (root / "images" / "fold1").mkdir(parents=True)
    (root / "masks" / "fold1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.float64)
    masks = np.zeros((n, size, size, 6), np.float64)
    masks[0, 2:6, 2:6, 0] = 7  # neoplastic nucleus with id 7
    masks[0, 10:14, 10:14, 1] = 7  # inflammatory nucleus reusing id 7 in its own channel
    masks[0, 20:24, 20:24, 4] = 3  # epithelial
    masks[..., 5] = masks[..., :5].sum(-1) == 0
    np.save(root / "images" / "fold1" / "images.npy", images)
    np.save(root / "masks" / "fold1" / "masks.npy", masks)
    np.save(root / "images" / "fold1" / "types.npy", np.array(["Breast", "Colon", "Breast"][:n]))
    return masks


def test_pannuke_fold_is_memory_mapped_and_maps_channels_to_types(tmp_path: Path) -> None:
    _write_pannuke_fold(tmp_path / "Fold 1")
    fold = PanNukeFold(tmp_path / "Fold 1")
    assert isinstance(fold.images, np.memmap) and isinstance(fold.masks, np.memmap)
    assert len(fold) == 3 and fold.tissue(1) == "Colon" and fold.size(0) == (32, 32)
    sample = fold.load(0)
    assert sample.image.dtype == np.uint8 and sample.image.shape == (32, 32, 3)
    # Three nuclei with distinct ids although two channels both used id 7.
    ids = np.unique(sample.inst_map[sample.inst_map > 0])
    assert len(ids) == 3
    assert sample.type_map[3, 3] == 1 and sample.type_map[11, 11] == 2 and sample.type_map[21, 21] == 5
    assert sample.inst_map[3, 3] != sample.inst_map[11, 11]
    assert (sample.type_map > 0).sum() == 3 * 16 == (sample.inst_map > 0).sum()


def test_pannuke_mask_conversion_by_hand() -> None:
    mask = np.zeros((4, 4, 6))
    mask[0, 0, 2] = 5
    mask[3, 3, 2] = 9
    mask[1, 1, 3] = 5
    inst, types = pannuke_mask_to_maps(mask)
    assert types[0, 0] == 3 and types[3, 3] == 3 and types[1, 1] == 4
    assert len({inst[0, 0], inst[3, 3], inst[1, 1]}) == 3 and inst.sum() == 1 + 2 + 3


def test_pannuke_missing_files_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"images\.npy"):
        PanNukeFold(tmp_path)


# ----------------------------------------------------------------------------------------------- CoNSeP
def test_consep_round_trip_on_real_tiles(shared_data: Path) -> None:
    root = shared_data / "nuclei" / "consep-tiles"
    source = ConsepFolder(root, merge_types=False)
    assert len(source) == 64
    total = 0
    for index in (0, 17, 63):
        sample = source.load(index)
        label = loadmat(root / "Labels" / f"{sample.name}.mat")
        assert sample.image.shape == (256, 256, 3) and sample.image.dtype == np.uint8
        np.testing.assert_array_equal(sample.inst_map, label["inst_map"].astype(np.int32))
        # inst_type row k is the type of id k + 1: the type map agrees with it inside every nucleus.
        for k, t in enumerate(label["inst_type"].ravel().astype(int), start=1):
            inside = sample.inst_map == k
            if inside.any():
                assert np.all(sample.type_map[inside] == t)
    for index in range(len(source)):
        total += len(np.unique(source.load(index).inst_map)) - 1
    assert total == 2315  # the README's count


def test_consep_7_to_4_merge(tmp_path: Path) -> None:
    (tmp_path / "Images").mkdir()
    (tmp_path / "Labels").mkdir()
    inst = np.arange(1, 8, dtype=np.float64).repeat(2).reshape(1, 14).repeat(3, 0)
    cv2.imwrite(str(tmp_path / "Images" / "a.png"), np.zeros((3, 14, 3), np.uint8))
    savemat(
        tmp_path / "Labels" / "a.mat",
        {"inst_map": inst, "type_map": inst.copy(), "inst_type": np.arange(1, 8)[:, None]},
    )
    merged = ConsepFolder(tmp_path, merge_types=True).load(0).type_map
    assert merged[0, ::2].tolist() == [1, 2, 3, 3, 4, 4, 4]
    assert ConsepFolder(tmp_path, merge_types=False).load(0).type_map[0, ::2].tolist() == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]


# ---------------------------------------------------------------------------------------------- generic
def test_generic_folder_with_16bit_png_and_types(tmp_path: Path) -> None:
    for sub in ("images", "labels", "types"):
        (tmp_path / sub).mkdir()
    inst = np.zeros((20, 20), np.uint16)
    inst[2:6, 2:6] = 300  # an id above 255 survives the 16-bit PNG
    cv2.imwrite(str(tmp_path / "images" / "x.png"), np.full((20, 20, 3), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "labels" / "x.png"), inst)
    np.save(tmp_path / "types" / "x.npy", (inst > 0).astype(np.uint8) * 2)
    sample = GenericFolder(tmp_path, num_types=2).load(0)
    assert sample.inst_map[3, 3] == 300 and sample.inst_map.dtype == np.int32
    assert sample.type_map is not None and sample.type_map[3, 3] == 2 and sample.type_map[10, 10] == 0


def test_subset_files(tmp_path: Path, shared_data: Path) -> None:
    source = ConsepFolder(shared_data / "nuclei" / "consep-tiles", merge_types=False)
    (tmp_path / "subset.csv").write_text("id,label\ntest_1_000,\ntest_2_003,\n")
    (tmp_path / "list.txt").write_text("# two tiles\ntest_1_000.png\ntest_3_001\n")
    assert read_subset_ids(tmp_path / "subset.csv") == {"test_1_000", "test_2_003"}
    assert Subset(source, read_subset_ids(tmp_path / "list.txt")).names == ["test_1_000", "test_3_001"]


# ---------------------------------------------------------------------------------------------- patches
def test_patches_targets_match_crops_of_the_input_patch(shared_data: Path) -> None:
    source = ConsepFolder(shared_data / "nuclei" / "consep-tiles", merge_types=False)
    patches = HoVerNetPatches([source], input_size=96, output_size=64, train=False, typed=True)
    assert len(patches) == 64 * 16  # a 4x4 grid of 64 px output windows per 256 px tile
    item = patches[5]  # image 0, grid row 1, column 1: output window [64:128, 64:128]
    sample = source.load(0)
    window = sample.inst_map[64:128, 64:128]
    np.testing.assert_array_equal(item["np"].numpy(), (window > 0).astype(np.int64))
    np.testing.assert_array_equal(item["tp"].numpy(), sample.type_map[64:128, 64:128])
    expected_hv = hv_map(sample.inst_map[48:144, 48:144])[:, 16:80, 16:80]
    np.testing.assert_allclose(item["hv"].numpy(), expected_hv)
    np.testing.assert_allclose(item["image"].numpy(), sample.image[48:144, 48:144].transpose(2, 0, 1) / 255.0)


def test_augmentation_moves_maps_with_the_image() -> None:
    class Painted(ConsepFolder):
        """Nuclei painted black on white so the image itself reveals where the instance map must be."""

        def __init__(self) -> None:
            self.names, self.num_types = ["p"], 0

        def size(self, index: int) -> tuple[int, int]:
            return 64, 64

        def load(self, index: int):  # type: ignore[override]
            from pathssl_cli.segment.datasets import NucleiSample

            inst = np.zeros((64, 64), np.int32)
            inst[5:15, 8:30] = 1  # asymmetric, so rotations and flips are visible
            inst[40:60, 44:50] = 2
            image = np.where(inst[..., None] > 0, 0, 255).astype(np.uint8).repeat(3, -1)
            return NucleiSample("p", image, inst, None)

    patches = HoVerNetPatches([Painted()], 64, 64, train=True, augment=AugmentConfig(stain=0.0))
    seen = set()
    for epoch in range(6):
        patches.set_epoch(epoch)
        item = patches[0]
        dark = item["image"].mean(0).numpy() < 0.5
        np.testing.assert_array_equal(dark, item["np"].numpy() == 1)
        seen.add(dark.tobytes())
    assert len(seen) > 1  # the augmentation did change the pose


def test_tiny_encoder_reduces_the_loss_on_real_tiles(shared_data: Path) -> None:
    torch.manual_seed(0)
    source = ConsepFolder(shared_data / "nuclei" / "consep-tiles", merge_types=False)
    patches = HoVerNetPatches([Subset(source, {"test_1_000", "test_2_000"})], 64, 64, train=False, typed=True)
    batch = torch.utils.data.default_collate([patches[i] for i in range(0, 32, 4)])
    model = build_hovernet("resnet_tiny", mode="same", input_size=64, num_types=5, decoder_width=0.125)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = hovernet_loss(model(batch["image"]), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pad_to_windows_partly_or_wholly_off_the_array() -> None:
    from pathssl_cli.segment.patches import pad_to

    array = np.arange(20).reshape(4, 5)
    np.testing.assert_array_equal(pad_to(array, 1, 1, 2, 3, reflect=True), array[1:3, 1:4])
    # Reflect about the edge without repeating it (numpy "reflect"): row -1 is row 1, column 5 is column 3.
    window = pad_to(array, -1, 3, 3, 3, reflect=True)
    np.testing.assert_array_equal(window, [[8, 9, 8], [3, 4, 3], [8, 9, 8]])
    assert pad_to(array, 6, 0, 2, 2, reflect=True).shape == (2, 2)  # wholly off: constant zeros
    assert not pad_to(array, 6, 0, 2, 2, reflect=True).any()


def test_target_context_gives_cut_nuclei_the_hv_of_their_whole_shape(shared_data: Path) -> None:
    """Mode 'same' (input = output): with train.target_context the HV targets of a patch are those of the maps
    around it, cropped, so a nucleus cut by the patch border keeps its whole-shape centre; without, the
    targets are computed on the patch alone (the old behaviour, still the default)."""
    source = ConsepFolder(shared_data / "nuclei" / "consep-tiles", merge_types=False)
    sample = source.load(0)
    plain = HoVerNetPatches([source], input_size=64, output_size=64, train=False, typed=True)
    wide = HoVerNetPatches([source], input_size=64, output_size=64, train=False, typed=True, target_context=32)
    item, item_wide = plain[5], wide[5]  # output window [64:128, 64:128]
    np.testing.assert_allclose(item["hv"].numpy(), hv_map(sample.inst_map[64:128, 64:128]))
    np.testing.assert_allclose(item_wide["hv"].numpy(), hv_map(sample.inst_map[32:160, 32:160])[:, 32:96, 32:96])
    assert not np.allclose(item["hv"].numpy(), item_wide["hv"].numpy())  # the tile has nuclei across the border
    for key in ("image", "np", "tp"):  # everything else is unchanged
        np.testing.assert_array_equal(item[key].numpy(), item_wide[key].numpy())


def test_target_context_keeps_maps_on_the_image_under_dihedral_poses() -> None:
    class Painted(ConsepFolder):
        def __init__(self) -> None:
            self.names, self.num_types = ["p"], 0

        def size(self, index: int) -> tuple[int, int]:
            return 96, 96

        def load(self, index: int):  # type: ignore[override]
            from pathssl_cli.segment.datasets import NucleiSample

            inst = np.zeros((96, 96), np.int32)
            inst[5:15, 8:40] = 1  # asymmetric and crossing patch borders
            inst[40:90, 60:70] = 2
            image = np.where(inst[..., None] > 0, 0, 255).astype(np.uint8).repeat(3, -1)
            return NucleiSample("p", image, inst, None)

    patches = HoVerNetPatches([Painted()], 48, 48, train=True, augment=AugmentConfig(stain=0.0), target_context=16)
    for epoch in range(8):
        patches.set_epoch(epoch)
        for index in range(len(patches)):
            item = patches[index]
            dark = item["image"].mean(0).numpy() < 0.5
            np.testing.assert_array_equal(dark, item["np"].numpy() == 1)
            assert ((item["hv"].numpy() != 0).any(0) <= dark).all()


def test_target_context_rejects_hovernet_augmentation() -> None:
    with pytest.raises(ValueError, match="dihedral"):
        HoVerNetPatches([], 64, 64, train=True, augment=AugmentConfig(hovernet=True), target_context=8)


def test_spec_target_context_needs_dihedral_augmentation() -> None:
    from pydantic import ValidationError

    from pathssl_cli.specs.segment import SegmentTrain

    assert SegmentTrain().target_context == 0  # off by default: the old targets
    assert SegmentTrain(augment="dihedral", target_context=32).target_context == 32
    with pytest.raises(ValidationError, match="dihedral"):
        SegmentTrain(augment="hovernet", target_context=32)
