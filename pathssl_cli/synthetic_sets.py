"""Synthetic data sets in the official layouts, for the demo, CI smoke runs and users' own pipelines.

Built on `pathssl_cli.synthetic` (the H&E-like renderer): labelled tiles as an ImageFolder, nuclei images in
CoNSeP's layout, and pyramidal slides (optionally a corrupt one, to exercise error handling).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.io

from pathssl_cli.synthetic import NUCLEUS_TYPES, render_tissue
from pathssl_cli.synthetic_slide import write_synthetic_slide

# Textures that hold nuclei; adipose and mucus are nearly empty and make poor segmentation examples.
NUCLEI_TEXTURES = ("tumour", "lymphocytes", "stroma", "necrosis")


def write_consep_like(root: str | Path, n_images: int = 8, size: int = 128, seed: int = 0,
                      mpp: float = 0.25) -> Path:
    """`root/Images/<name>.png` + `root/Labels/<name>.mat` exactly as the CoNSeP release lays them out.

    Each .mat holds `inst_map` (H×W, 0 = background, ids 1..N), `type_map` (H×W), `inst_type` (N×1, row k is the
    type of id k+1) and `inst_centroid` (N×2, x, y). Types index `NUCLEUS_TYPES` from 1.
    """
    root = Path(root)
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(n_images):
        texture = NUCLEI_TEXTURES[index % len(NUCLEI_TEXTURES)]
        rgb, inst, types = render_tissue(rng, size, size, texture, mpp)
        ids = np.arange(1, int(inst.max()) + 1)
        inst_type = np.zeros((len(ids), 1), np.int32)
        centroids = np.zeros((len(ids), 2), np.float64)
        for k, inst_id in enumerate(ids):
            rows, cols = np.nonzero(inst == inst_id)
            if rows.size:
                inst_type[k, 0] = np.bincount(types[rows, cols]).argmax()
                centroids[k] = (cols.mean(), rows.mean())
        name = f"synthetic_{index:03d}"
        cv2.imwrite(str(root / "Images" / f"{name}.png"), rgb[..., ::-1])
        scipy.io.savemat(root / "Labels" / f"{name}.mat", {
            "inst_map": inst.astype(np.int32), "type_map": types.astype(np.int32),
            "inst_type": inst_type, "inst_centroid": centroids})
    return root


def write_slides(out: str | Path, count: int = 2, size: int = 4096, mpp: float = 0.25, seed: int = 0,
                 corrupt: bool = False) -> list[Path]:
    """`count` synthetic pyramidal slides (`slide_<i>.tif`); with `corrupt`, one more that is truncated."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = out / f"slide_{index:02d}.tif"
        write_synthetic_slide(path, width=size, height=size, mpp=mpp, seed=seed + index)
        paths.append(path)
    if corrupt:
        broken = out / "corrupt_slide.tif"
        data = paths[0].read_bytes()
        broken.write_bytes(data[: len(data) // 3])  # a download cut short
        paths.append(broken)
    return paths



def write_two_site_folder(root: str | Path, n_per_class: int, size: int, seed: int,
                          site_shift: float = 0.15) -> Path:
    """An ImageFolder whose val/test tiles come from a second "site": each image's RGB channels are scaled by
    factors drawn from U(1 - site_shift, 1 + site_shift), the scanner and staining differences that make
    pathology models fail across hospitals. Random-init features key on colour and suffer; features learned
    with stain and colour augmentation should not.
    """
    from pathssl_cli.synthetic import write_image_folder

    root = write_image_folder(root, n_per_class, size, seed)
    rng = np.random.default_rng(seed + 7919)
    for split in ("val", "test"):
        for path in sorted((root / split).rglob("*.png")):
            image = np.asarray(cv2.imread(str(path)), np.float32)
            gains = rng.uniform(1 - site_shift, 1 + site_shift, 3).astype(np.float32)
            cv2.imwrite(str(path), np.clip(image * gains, 0, 255).astype(np.uint8))
    return root


__all__ = ["NUCLEI_TEXTURES", "NUCLEUS_TYPES", "write_consep_like", "write_slides", "write_two_site_folder"]
