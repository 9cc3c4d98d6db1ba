"""Post-processing throughput: pathssl's vectorised HoVer-Net post-processing vs the official algorithm.

`official_postprocess` below re-implements vqdang/hover_net `models/hovernet/post_proc.py` (`__proc_np_hv` and
`process`) naively, the way the official code is written: skimage-style small-object removal, a full-image
boolean mask per instance for bbox/centroid/contour, and a second per-instance loop for the type vote. The
tests use it as the reference that `hovernet_postprocess` must agree with.

Inputs are "ideal" network outputs built from real CoNSeP tiles (or synthetic tissue when the shared data is
absent): NP = the foreground mask lightly blurred, HV = `hv_map` of the truth plus noise, NC = one-hot types.

    python benchmarks/postproc_throughput.py [--tiles 32] [--repeats 5] [--size 256]
    python benchmarks/postproc_throughput.py --tiles 2 --repeats 3 --size 1024   # larger outputs

Prints tiles per CPU-second (median over repeats, one thread) for both, their ratio, and the PQ of ours
against the official output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes
from scipy.ndimage import label as scipy_label
from skimage.segmentation import watershed

CONSEP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nuclei" / "consep-tiles"


# ----------------------------------------------------------------------------------------------------
# Naive re-implementation of the official post-processing (reference; deliberately not optimised)
# ----------------------------------------------------------------------------------------------------
def _remove_small_objects_official(labels: np.ndarray, min_size: int) -> np.ndarray:
    out = labels.copy()
    component_sizes = np.bincount(out.ravel())
    too_small = component_sizes < min_size
    out[too_small[out]] = 0
    return out


def _bounding_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    rmin, rmax = np.where(rows)[0][[0, -1]]
    cmin, cmax = np.where(cols)[0][[0, -1]]
    return [int(rmin), int(rmax) + 1, int(cmin), int(cmax) + 1]


def official_instance_map(np_prob: np.ndarray, hv: np.ndarray) -> np.ndarray:
    """`__proc_np_hv` as in hover_net, with channels-first HV input."""
    blb = np.array(np_prob >= 0.5, dtype=np.int32)
    blb = scipy_label(blb)[0]
    blb = _remove_small_objects_official(blb, min_size=10)
    blb[blb > 0] = 1
    h_dir = cv2.normalize(
        hv[0].astype(np.float32), None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F
    )
    v_dir = cv2.normalize(
        hv[1].astype(np.float32), None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F
    )
    sobelh = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=21)
    sobelv = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=21)
    sobelh = 1 - cv2.normalize(sobelh, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelv = 1 - cv2.normalize(sobelv, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sobelh, sobelv)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)
    overall = np.array(overall >= 0.4, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = binary_fill_holes(marker).astype("uint8")
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = scipy_label(marker)[0]
    marker = _remove_small_objects_official(marker, min_size=10)
    return watershed(dist, markers=marker, mask=blb)


def official_postprocess(
    np_prob: np.ndarray,
    hv: np.ndarray,
    type_prob: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[int, dict]]:
    """`process` as in hover_net: per-instance full-image masks, then a per-instance type vote."""
    pred_inst = official_instance_map(np_prob, hv)
    inst_info: dict[int, dict] = {}
    for inst_id in np.unique(pred_inst)[1:]:
        mask = pred_inst == inst_id
        rmin, rmax, cmin, cmax = _bounding_box(mask)
        crop = mask[rmin:rmax, cmin:cmax].astype(np.uint8)
        moment = cv2.moments(crop)
        contour = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0][0]
        contour = np.squeeze(contour.astype("int32"))
        if contour.ndim != 2 or contour.shape[0] < 3:
            continue
        contour[:, 0] += cmin
        contour[:, 1] += rmin
        inst_info[int(inst_id)] = {
            "bbox": (rmin, cmin, rmax, cmax),
            "centroid": (moment["m10"] / moment["m00"] + cmin, moment["m01"] / moment["m00"] + rmin),
            "contour": contour,
            "type": None,
            "type_prob": None,
        }
    if type_prob is not None:
        pred_type = np.argmax(type_prob, axis=0).astype(np.int32)
        for inst_id, info in inst_info.items():
            rmin, cmin, rmax, cmax = info["bbox"]
            in_inst = pred_inst[rmin:rmax, cmin:cmax] == inst_id
            votes = pred_type[rmin:rmax, cmin:cmax][in_inst]
            type_list = sorted(
                zip(*np.unique(votes, return_counts=True), strict=True), key=lambda v: v[1], reverse=True
            )
            inst_type = type_list[0][0]
            if inst_type == 0 and len(type_list) > 1:
                inst_type = type_list[1][0]
            counts = {int(t): int(c) for t, c in type_list}
            info["type"] = int(inst_type)
            info["type_prob"] = counts[int(inst_type)] / (np.sum(in_inst) + 1.0e-6)
    return pred_inst, inst_info


# ----------------------------------------------------------------------------------------------------
# Ideal network outputs from ground truth
# ----------------------------------------------------------------------------------------------------
def ideal_outputs(
    inst: np.ndarray,
    types: np.ndarray,
    n_types: int,
    rng: np.random.Generator,
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(np_prob, hv, type_prob) a well-trained HoVer-Net would output for this truth, with mild noise."""
    from pathssl_cli.segment.targets import hv_map

    fg = (inst > 0).astype(np.float32)
    np_prob = np.clip(cv2.GaussianBlur(fg, (3, 3), 0) + rng.normal(0, noise, fg.shape), 0, 1).astype(
        np.float32
    )
    hv = np.clip(hv_map(inst, min_size=0) + rng.normal(0, noise, (2, *inst.shape)), -1, 1).astype(np.float32)
    type_prob = np.eye(n_types, dtype=np.float32)[np.clip(types, 0, n_types - 1)].transpose(2, 0, 1)
    return np_prob, hv, type_prob


def load_tiles(n_tiles: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real CoNSeP truth when the shared data exists (256 px tiles, laid side by side for larger sizes, ids
    offset so they stay unique), else synthetic tissue at 40x."""
    labels = sorted((CONSEP / "Labels").glob("*.mat")) if CONSEP.exists() else []
    tiles: list[tuple[np.ndarray, np.ndarray]] = []
    if labels:
        from pathssl_cli.segment.io import read_consep_label

        per_side = -(-size // 256)
        cursor = 0
        while len(tiles) < n_tiles:
            inst = np.zeros((per_side * 256, per_side * 256), np.int32)
            types = np.zeros_like(inst)
            for k in range(per_side * per_side):
                label = read_consep_label(labels[cursor % len(labels)])
                cursor += 1
                r, c = divmod(k, per_side)
                box = np.s_[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                inst[box] = np.where(label.inst_map > 0, label.inst_map + inst.max(), 0)
                types[box] = label.type_map
            tiles.append((inst[:size, :size], types[:size, :size].astype(np.int64)))
        return tiles
    from pathssl_cli.synthetic import render_tissue

    rng = np.random.default_rng(seed)
    while len(tiles) < n_tiles:
        _, inst, types = render_tissue(
            rng, size, size, ["tumour", "lymphocytes", "stroma"][len(tiles) % 3], mpp=0.25
        )
        tiles.append((inst, types.astype(np.int64)))
    return tiles


def _rates(fns: dict, inputs: list, repeats: int) -> dict[str, list[float]]:
    """Tiles per CPU-second of each function per repeat.

    CPU time of this process (single-threaded here) rather than wall time, because the benchmark machine is
    shared; repeats alternate between functions so any remaining drift hits both.
    """
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            for args in inputs:
                fn(*args)
            rates[name].append(len(inputs) / (time.process_time() - start))
    return rates


def main() -> None:
    from pathssl_cli.segment.metrics import panoptic_quality
    from pathssl_cli.segment.postproc import hovernet_postprocess

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cv2.setNumThreads(1)  # compare algorithms, not thread pools (and keep CPU time = single-thread time)
    rng = np.random.default_rng(args.seed)
    tiles = load_tiles(args.tiles, args.size, args.seed)
    inputs = [ideal_outputs(inst, types, 5, rng) for inst, types in tiles]
    n_nuclei = sum(int(len(np.unique(inst)) - 1) for inst, _ in tiles)

    pq = [panoptic_quality(official_postprocess(*x)[0], hovernet_postprocess(*x)[0])["pq"] for x in inputs]
    rates = _rates({"official": official_postprocess, "ours": hovernet_postprocess}, inputs, args.repeats)
    official, ours = statistics.median(rates["official"]), statistics.median(rates["ours"])
    ratios = [o / r for o, r in zip(rates["ours"], rates["official"], strict=True)]
    size = f"{args.size}x{args.size} px"
    print(f"{len(inputs)} tiles of {size}, {n_nuclei} true nuclei, {args.repeats} repeats")
    print(f"official-style (naive loops): {official:8.1f} tiles/s (per CPU-second, 1 thread)")
    print(f"pathssl (vectorised):         {ours:8.1f} tiles/s (per CPU-second, 1 thread)")
    spread = f"per-repeat ratios {min(ratios):.2f}-{max(ratios):.2f}"
    print(f"speed-up:                     {ours / official:8.2f}x  (medians; {spread})")
    print(f"PQ(ours vs official): min {min(pq):.4f}, mean {float(np.mean(pq)):.4f}")


if __name__ == "__main__":
    main()
