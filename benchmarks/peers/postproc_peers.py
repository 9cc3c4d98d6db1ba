"""HoVer-Net post-processing against the tools people use: pathssl `hovernet_postprocess`, TIAToolbox's port
(`HoVerNet._proc_np_hv` + `HoVerNet.get_instance_info`) and the official vqdang/hover_net `process()`, on the same
NP/HV/type maps, interleaved in one run.

The maps are those of `benchmarks/postproc_throughput.py`: ideal network outputs derived from the ground truth of
the real CoNSeP tiles in ../shared/data (NP = blurred foreground + noise, HV = `hv_map` of the truth + noise,
type = one-hot truth), 48 tiles of 256 px by default. Every contender gets them from one .npz file, so a peer in
another virtual environment reads the very same floats.

The official code: the `hover-net` package on PyPI (0.0.10, github.com/leandermaerkisch/hover_net) is a fork
whose `hover_net/models/hovernet/post_proc.py` has the statements of vqdang/hover_net's
`models/hovernet/post_proc.py` (master, d801137) unchanged; only its imports differ (the package path
`hover_net.misc.utils`, unused imports dropped), and `misc/utils.py`'s `get_bounding_box` and
`remove_small_objects` are the official ones. So it is timed as the official code. Its pins (numpy < 2,
scikit-image < 0.20, pillow < 10) cannot live beside pathssl's, hence its own venv (README of this folder).
The naive re-implementation of the official loops in postproc_throughput.py is timed beside it, on this
environment's numpy and scikit-image (and alone when the package is absent).

    python benchmarks/peers/postproc_peers.py [--tiles 48] [--repeats 5] \
        [--tiatoolbox-python /work/peers-tia-venv/bin/python] [--hovernet-python /work/peers-hovernet-venv/bin/python]

Agreement: instance maps are compared as partitions (the official ids are marker labels with gaps, pathssl's are
1..N in the same order); records (bbox, centroid, contour, type) of instances with identical pixels are compared
field by field; instances the peers drop from their dictionaries (contours of < 3 points) are counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import one_thread

if __name__ == "__main__":
    one_thread()

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------------
# Contenders: each reads the maps file, processes every tile; with `out`, saves what it found for the checks.
# ------------------------------------------------------------------------------------------------------------
def _load(maps: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.load(maps)
    return data["np_prob"], data["hv"], data["type_prob"]


def _save(out: str, inst: list[np.ndarray], records: list[list[tuple]]) -> None:
    """Instance maps (T, H, W) and one row per described instance: tile, id, bbox (rmin, cmin, rmax, cmax),
    centroid (x, y), type; contours concatenated with offsets."""
    rows = [(t, *r[:-1]) for t, tile in enumerate(records) for r in tile]
    contours = [r[-1].reshape(-1, 2) for tile in records for r in tile]
    np.savez(
        out,
        inst=np.stack(inst).astype(np.int64),
        rec=np.array([row[:6] for row in rows], dtype=np.int64).reshape(-1, 6),
        centroid=np.array([row[6:8] for row in rows], dtype=np.float64).reshape(-1, 2),
        rec_type=np.array([row[8] for row in rows], dtype=np.int64),
        contour=np.concatenate(contours) if contours else np.zeros((0, 2), np.int64),
        contour_len=np.array([len(c) for c in contours], dtype=np.int64),
    )


def pathssl_postproc(maps: str, out: str | None = None) -> dict[str, int]:
    from pathssl_cli.segment.postproc import hovernet_postprocess

    np_prob, hv, type_prob = _load(maps)
    inst, records = [], []
    for k in range(len(np_prob)):
        pred, info = hovernet_postprocess(np_prob[k], hv[k], type_prob[k])
        inst.append(pred)
        records.append([(i, *r.bbox, *r.centroid, r.type, r.contour) for i, r in info.items()])
    if out:
        _save(out, inst, records)
    return {"tiles": len(inst), "instances": sum(len(r) for r in records)}


def tiatoolbox_postproc(maps: str, out: str | None = None) -> dict[str, int]:
    """TIAToolbox 2.x: the static steps `HoVerNet.postproc` runs (without its dask/dict repacking)."""
    from tiatoolbox.models.architecture.hovernet import HoVerNet

    np_prob, hv, type_prob = _load(maps)
    inst, records = [], []
    for k in range(len(np_prob)):
        np_map = np_prob[k][..., None]  # (H, W, 1) as `infer_batch` returns
        hv_map = np.ascontiguousarray(hv[k].transpose(1, 2, 0))  # (H, W, 2)
        tp_map = np.argmax(type_prob[k], axis=0).astype(np.uint8)  # `infer_batch` argmaxes the NC softmax
        pred = HoVerNet._proc_np_hv(np_map, hv_map)
        info = HoVerNet.get_instance_info(pred, tp_map, verbose=False)
        inst.append(pred)
        # box is (x_min, y_min, x_max, y_max)
        records.append(
            [
                (int(i), r["box"][1], r["box"][0], r["box"][3], r["box"][2], *r["centroid"], r["type"], r["contours"])
                for i, r in info.items()
            ]
        )
    if out:
        _save(out, inst, records)
    return {"tiles": len(inst), "instances": sum(len(r) for r in records)}


def _official_records(info: dict) -> list[tuple]:
    return [
        (int(i), *np.asarray(r["bbox"]).ravel()[[0, 1, 2, 3]], *r["centroid"], r["type"], r["contour"])
        for i, r in info.items()
    ]


def official_postproc(maps: str, out: str | None = None) -> dict[str, int]:
    """vqdang/hover_net `process(pred_map, nr_types)`, from the `hover-net` package (see the module docstring).

    `pred_map` is the official layout: (H, W, 4) = argmax type, NP probability, H, V."""
    from hover_net.models.hovernet.post_proc import process

    np_prob, hv, type_prob = _load(maps)
    inst, records = [], []
    for k in range(len(np_prob)):
        pred_type = np.argmax(type_prob[k], axis=0).astype(np.float32)
        pred_map = np.concatenate([pred_type[..., None], np_prob[k][..., None], hv[k].transpose(1, 2, 0)], -1)
        pred, info = process(pred_map, nr_types=type_prob.shape[1])
        inst.append(pred)
        records.append(_official_records(info))  # bbox [[rmin, cmin], [rmax, cmax]]
    if out:
        _save(out, inst, records)
    return {"tiles": len(inst), "instances": sum(len(r) for r in records)}


def _reimplementation() -> Any:
    spec = importlib.util.spec_from_file_location("postproc_throughput", ROOT / "benchmarks" / "postproc_throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def reimplemented_postproc(maps: str, out: str | None = None) -> dict[str, int]:
    """The naive re-implementation of the official loops (benchmarks/postproc_throughput.py)."""
    official = _reimplementation().official_postprocess
    np_prob, hv, type_prob = _load(maps)
    inst, records = [], []
    for k in range(len(np_prob)):
        pred, info = official(np_prob[k], hv[k], type_prob[k])
        inst.append(pred)
        records.append(
            [(int(i), r["bbox"][0], r["bbox"][1], r["bbox"][2], r["bbox"][3], *r["centroid"], r["type"],
              r["contour"]) for i, r in info.items()]
        )
    if out:
        _save(out, inst, records)
    return {"tiles": len(inst), "instances": sum(len(r) for r in records)}


# ------------------------------------------------------------------------------------------------------------
# Inputs and agreement (pathssl side)
# ------------------------------------------------------------------------------------------------------------
def write_maps(path: Path, n_tiles: int, size: int = 256, seed: int = 0, noise: float = 0.05) -> int:
    """The benchmark's ideal outputs of `n_tiles` real CoNSeP tiles, saved for every contender; returns the
    number of true nuclei."""
    bench = _reimplementation()
    rng = np.random.default_rng(seed)
    tiles = bench.load_tiles(n_tiles, size, seed)
    outputs = [bench.ideal_outputs(inst, types, 5, rng, noise=noise) for inst, types in tiles]
    np.savez(
        path,
        np_prob=np.stack([o[0] for o in outputs]),
        hv=np.stack([o[1] for o in outputs]),
        type_prob=np.stack([o[2] for o in outputs]),
    )
    return sum(int(len(np.unique(inst)) - 1) for inst, _ in tiles)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Do two instance maps hold the same instances (same pixel sets, background alike), whatever the ids?"""
    if not np.array_equal(a == 0, b == 0):
        return False
    fg = a != 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def compare(ours_path: str, theirs_path: str) -> dict[str, Any]:
    """Tiles with identical instance partitions; for instances present in both records (matched by pixels),
    how many have a different bbox, centroid (> 1e-9 px), contour or type; instances only one side describes."""
    ours, theirs = np.load(ours_path), np.load(theirs_path)
    tiles = len(ours["inst"])
    identical = [same_partition(ours["inst"][t], theirs["inst"][t]) for t in range(tiles)]
    lookups = []
    for data in (ours, theirs):
        starts = np.concatenate([[0], np.cumsum(data["contour_len"])])
        lookups.append(
            {
                (int(r[0]), int(r[1])): (tuple(r[2:6]), data["centroid"][k], int(data["rec_type"][k]),
                                         data["contour"][starts[k] : starts[k + 1]])
                for k, r in enumerate(data["rec"])
            }
        )
    ours_rec, theirs_rec = lookups
    differ = {"bbox": 0, "centroid": 0, "contour": 0, "type": 0}
    matched = only_ours = only_theirs = 0
    for t in range(tiles):
        a, b = ours["inst"][t], theirs["inst"][t]
        fg = a != 0
        pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1).T if fg.any() else np.zeros((0, 2), int)
        for id_a, id_b in pairs.tolist():
            ra, rb = ours_rec.get((t, id_a)), theirs_rec.get((t, id_b))
            if ra is None or rb is None:
                only_ours += ra is not None
                only_theirs += rb is not None
                continue
            matched += 1
            differ["bbox"] += ra[0] != rb[0]
            differ["centroid"] += not np.allclose(ra[1], rb[1], rtol=0, atol=1e-9)
            differ["type"] += ra[2] != rb[2]
            differ["contour"] += not np.array_equal(ra[3], rb[3])
    return {
        "tiles": tiles,
        "identical_maps": int(sum(identical)),
        "matched_records": matched,
        "differ": differ,
        "described_only_by_pathssl": only_ours,
        "described_only_by_peer": only_theirs,
    }


def main() -> None:
    from harness import (
        Contender,
        find_peer,
        interleave,
        load_average,
        machine_report,
        paired_ratio,
        print_table,
        settle_threads,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=48, help="CoNSeP tiles (256 px) per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.05, help="noise added to the ideal NP/HV maps")
    parser.add_argument(
        "--tiatoolbox-python", default=os.environ.get("PATHSSL_TIATOOLBOX_PYTHON"),
        help="python of a venv with tiatoolbox (its torch pin clashes)"
    )
    parser.add_argument(
        "--hovernet-python", default=os.environ.get("PATHSSL_HOVERNET_PYTHON"),
        help="python of a venv with the hover-net package (official code)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    settle_threads()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pathssl_peers_postproc_"))
    workdir.mkdir(parents=True, exist_ok=True)
    maps = workdir / "maps.npz"
    nuclei = write_maps(maps, args.tiles, noise=args.noise)

    contenders = [Contender("pathssl", "postproc_peers", "pathssl_postproc")]
    tia = find_peer(
        "TIAToolbox", "tiatoolbox", "postproc_peers", "tiatoolbox_postproc", args.tiatoolbox_python,
        "Its torch<2.13 pin clashes with pathssl's torch: python -m venv VENV && VENV/bin/pip install "
        "tiatoolbox==2.1.3, then pass --tiatoolbox-python VENV/bin/python",
    )
    official = find_peer(
        "official hover_net", "hover_net", "postproc_peers", "official_postproc", args.hovernet_python,
        "Its pins (numpy<2, scikit-image<0.20) clash with pathssl's: python -m venv VENV && VENV/bin/pip "
        "install hover-net==0.0.10, then pass --hovernet-python VENV/bin/python (the re-implementation of the "
        "official loops is timed either way)",
    )
    # The re-implementation runs on this environment's numpy/scikit-image: beside the official code (on the
    # versions its pins give), it shows how much of the gap is the libraries.
    loops = Contender("official loops (re-implementation)", "postproc_peers", "reimplemented_postproc")
    contenders += [c for c in (tia, official, loops) if c is not None]

    for line in machine_report():
        print(line)
    for c in contenders:
        versions = c.versions(["numpy", "scipy", "scikit-image", "opencv-python", "opencv-python-headless",
                               "tiatoolbox", "hover-net"])
        shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v != "-")
        print(f"  {c.label}: {c.where}; {shown}")
    outputs = {c.label: str(workdir / f"{c.label.replace(' ', '_')}.npz") for c in contenders}
    series = interleave_with_outputs(contenders, args.repeats, maps, outputs, interleave)
    for c in contenders:
        c.close()
    print(load_average() + " (after)")

    ours = series["pathssl"]
    rows = []
    for c in contenders:
        s = series[c.label]
        row = [c.label, f"{args.tiles / s.median_wall():.1f}", f"{args.tiles / s.median_cpu():.1f}",
               f"{s.median_wall():.2f}", f"{s.median_cpu():.2f}"]
        if c.label == "pathssl":
            row += ["1", "-"]
        else:
            wall = paired_ratio(ours, s, args.tiles, args.tiles)
            cpu = paired_ratio(ours, s, args.tiles, args.tiles, clock="cpu")
            check = compare(outputs["pathssl"], outputs[c.label])
            row += [f"{wall[0]:.2f}x / {cpu[0]:.2f}x ({min(wall[1], cpu[1]):.2f}-{max(wall[2], cpu[2]):.2f})",
                    f"{check['identical_maps']}/{check['tiles']} maps; records differ {check['differ']}, "
                    f"described only by pathssl {check['described_only_by_pathssl']}, only by peer "
                    f"{check['described_only_by_peer']}"]
        rows.append(row)
    print(f"{args.tiles} CoNSeP tiles of 256 px ({nuclei} true nuclei), noise {args.noise}, median of "
          f"{args.repeats} interleaved repeats, one thread per process")
    print_table(["tool", "tiles/s", "tiles/CPU-s", "wall-s", "CPU-s", "pathssl speed-up (wall / CPU, range)",
                 "agreement with pathssl"], rows)


def interleave_with_outputs(contenders: list, repeats: int, maps: Path, outputs: dict[str, str], interleave: Any
                            ) -> dict:
    """One untimed call per contender that saves its outputs, then the interleaved timed repeats."""
    for c in contenders:
        c.run(maps=str(maps), out=outputs[c.label])
    return interleave(contenders, repeats, warmup=False, maps=str(maps))


if __name__ == "__main__":
    main()
