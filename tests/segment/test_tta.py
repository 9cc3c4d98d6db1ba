"""Test-time augmentation: each pose is undone exactly on NP, TP and (as a vector field) HV."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from scipy import ndimage

from pathssl_cli.segment.inference import POSES, pose_averaged_outputs, predict_window
from pathssl_cli.segment.metrics import instance_stats
from pathssl_cli.segment.postproc import hovernet_postprocess
from pathssl_cli.segment.readers import ImageReader
from pathssl_cli.segment.targets import hv_map
from pathssl_cli.specs.segment import TTAChoice


class VectorFieldModel:
    """Exactly equivariant under the square's symmetries: NP and TP are per-pixel functions of the image, and
    HV is each pixel's offset (x, y) from the patch centre scaled by the pixel's red value, a true vector
    field. Undoing a pose wrongly (a missed sign or swap of HV) changes the averaged output."""

    input_size = output_size = 16

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        rows = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(b, h, w) - (h - 1) / 2
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(b, h, w) - (w - 1) / 2
        return {"np": 4 * x[:, :2], "hv": torch.stack([cols, rows], 1) * x[:, :1], "tp": 3 * x}


@pytest.mark.parametrize("pose", POSES["dihedral"])
def test_each_pose_is_undone_exactly(pose: tuple[int, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(POSES, "one pose", (pose,))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = pose_averaged_outputs(VectorFieldModel(), x, "none")
    posed = pose_averaged_outputs(VectorFieldModel(), x, "one pose")  # type: ignore[arg-type]
    for key in plain:
        torch.testing.assert_close(posed[key], plain[key], rtol=0, atol=1e-6, msg=key)


def test_pose_sets() -> None:
    assert set(POSES) == set(get_args(TTAChoice))  # every spec choice has its poses
    assert POSES["none"] == ((0, False),)
    assert len(set(POSES["flips"])) == 4 and len(set(POSES["dihedral"])) == 8
    # 'flips' = identity, left-right mirror, half turn, and half turn of the mirror (= up-down mirror).
    x = torch.arange(16.0).view(1, 1, 4, 4)
    images = {tuple(torch.rot90(x.flip(-1) if m else x, k, dims=(-2, -1)).flatten().tolist())
              for k, m in POSES["flips"]}
    assert images == {tuple(v.flatten().tolist()) for v in (x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2))}


def test_averaging_is_the_mean_of_the_restored_poses() -> None:
    """With a model that is not equivariant, TTA is the mean over poses of the restored probabilities."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def model(x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = conv(x)
        return {"np": y[:, :2], "hv": y[:, 2:4]}

    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        out = pose_averaged_outputs(model, x, "flips")  # type: ignore[arg-type]
        identity = torch.softmax(model(x)["np"], 1)
        mirrored = torch.softmax(model(x.flip(-1))["np"], 1).flip(-1)
        half = torch.rot90(torch.softmax(model(torch.rot90(x, 2, (-2, -1)))["np"], 1), 2, (-2, -1))
        both = torch.rot90(torch.softmax(model(torch.rot90(x.flip(-1), 2, (-2, -1)))["np"], 1), 2, (-2, -1)).flip(-1)
        torch.testing.assert_close(out["np"], (identity + mirrored + half + both) / 4)
        hv_mirrored = model(x.flip(-1))["hv"].flip(-1)
        hv_half = torch.rot90(model(torch.rot90(x, 2, (-2, -1)))["hv"], 2, (-2, -1))
        # The vertical component: a mirror keeps it, a half turn negates both components.
        expected_v = (model(x)["hv"][:, 1] + hv_mirrored[:, 1] - hv_half[:, 1]
                      - torch.rot90(model(torch.rot90(x.flip(-1), 2, (-2, -1)))["hv"], 2, (-2, -1)).flip(-1)[:, 1]) / 4
        torch.testing.assert_close(out["hv"][:, 1], expected_v)


class ComponentsModel(torch.nn.Module):
    """Dark pixels are nuclei; HV are the official targets of their connected components (window-local)."""

    input_size = output_size = 128

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fg = (x.mean(1) < 0.5).numpy()
        hv = np.stack([hv_map(ndimage.label(f)[0], min_size=1) for f in fg])
        logit = torch.from_numpy(np.where(fg, 10.0, -10.0).astype(np.float32))
        return {"np": torch.stack([-logit, logit], 1), "hv": torch.from_numpy(hv)}


def test_dihedral_tta_keeps_the_instances_of_an_ideal_network() -> None:
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[:128, :128]
    dark = np.zeros((128, 128), bool)
    for _ in range(40):  # separate ellipses, as nuclei (the official 21 px Sobel needs them 10+ px wide)
        r, c, a, b = *rng.integers(12, 116, 2), *rng.integers(5, 11, 2)
        disc = ((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 <= 1
        if not (ndimage.binary_dilation(disc, iterations=2) & dark).any():
            dark |= disc
    truth = ndimage.label(dark)[0]
    rgb = np.where(dark[..., None], 40, 230).astype(np.uint8).repeat(3, -1)
    model = ComponentsModel()
    plain = predict_window(model, ImageReader(rgb), 0, 0, 128, 128)  # one patch: no tile seams
    tta = predict_window(model, ImageReader(rgb), 0, 0, 128, 128, tta="dihedral")
    np.testing.assert_array_equal(tta[0], plain[0])  # NP of this model is per-pixel: exactly the same
    # HoVer-Net's HV targets put the zero one pixel left of (above) the centroid (their grid starts at 1), so
    # a mirrored pose moves it to the other side and the average centres it: HV differs near the zero, but
    # the watershed finds the same nuclei.
    assert truth.max() >= 8
    for outputs in (plain, tta):
        inst, _ = hovernet_postprocess(*outputs)
        assert instance_stats(truth, inst)["pq"] == 1.0
