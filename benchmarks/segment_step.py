"""HoVer-Net training-step cost on CPU, split into its two parts, each against its baseline in the same run:

- the model step (forward, loss, backward, Adam) with weights and activations in NCHW (PyTorch's default)
  vs NHWC (`run.channels_last`, oneDNN's preferred layout);
- inference (`segment eval` / `predict`: forward only, no gradients) in the same two layouts;
- the data (one batch of augmented patches with HV targets) with the decoded-image cache off vs on
  (`train.image_cache_mb`).

The spec defaults to the shipped CPU recipe on the real CoNSeP sample tiles (synthetic nuclei when the shared
data is absent). Interleaved repeats; medians.

    python benchmarks/segment_step.py [--spec specs/segment/cpu_consep.toml] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from pathssl_cli.segment.losses import LossWeights, hovernet_loss
from pathssl_cli.segment.train import _patches, build_model
from pathssl_cli.specs import load_spec
from pathssl_cli.specs.segment import SegmentSpec

ROOT = Path(__file__).resolve().parents[1]
CONSEP = ROOT / ".." / "shared" / "data" / "nuclei" / "consep-tiles"


def _spec(path: Path, scratch: Path) -> SegmentSpec:
    overrides = []
    if not CONSEP.is_dir():
        from pathssl_cli.synthetic_sets import write_consep_like

        root = write_consep_like(scratch / "nuclei", n_images=16, size=256)
        overrides = [f"data.train=['{root}']", f"data.test=['{root}']"]
    return load_spec(path, overrides)


def _model_step_ms(spec: SegmentSpec, batches: list[dict[str, torch.Tensor]], channels_last: bool) -> float:
    torch.manual_seed(0)
    model = build_model(spec).use_channels_last(channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.train.lr)
    weights = LossWeights(**spec.train.loss.model_dump())
    times = []
    for index, batch in enumerate(batches * 2):
        start = time.perf_counter()
        loss, _ = hovernet_loss(model(batch["image"]), batch, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= 2:  # the first steps allocate oneDNN primitives
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def _inference_ms(spec: SegmentSpec, batches: list[dict[str, torch.Tensor]], channels_last: bool) -> float:
    torch.manual_seed(0)
    model = build_model(spec).use_channels_last(channels_last).eval()
    times = []
    for index, batch in enumerate(batches * 2):
        start = time.perf_counter()
        model(batch["image"])
        if index >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _data_ms(spec: SegmentSpec, cache_mb: float, batches: int) -> float:
    dataset = _patches(spec, "train", train=True)
    dataset.cache.budget_bytes = int(cache_mb * 2**20)
    batch_size = spec.train.phase2_batch_size
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    times = []
    for epoch in range(2):  # the second epoch is the steady state: a warm cache, as in a long run
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        for index in order[: batches * batch_size]:
            dataset[index]
        times.append(time.perf_counter() - start)
    return 1000 * times[-1] / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "segment" / "cpu_consep.toml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        spec = _spec(args.spec, Path(scratch))
        dataset = _patches(spec, "train", train=True)
        batch_size = spec.train.phase2_batch_size
        batches = [default_collate([dataset[(b * batch_size + i) % len(dataset)] for i in range(batch_size)])
                   for b in range(args.batches)]
        rows: dict[str, list[float]] = {"NCHW": [], "NHWC": [], "infer NCHW": [], "infer NHWC": [],
                                        "data, no cache": [], "data, cache": []}
        for _ in range(args.repeats):
            rows["NCHW"].append(_model_step_ms(spec, batches, channels_last=False))
            rows["NHWC"].append(_model_step_ms(spec, batches, channels_last=True))
            rows["infer NCHW"].append(_inference_ms(spec, batches, channels_last=False))
            rows["infer NHWC"].append(_inference_ms(spec, batches, channels_last=True))
            rows["data, no cache"].append(_data_ms(spec, 0, args.batches))
            rows["data, cache"].append(_data_ms(spec, 256, args.batches))
    median = {name: statistics.median(values) for name, values in rows.items()}
    print(f"{torch.get_num_threads()} torch threads, batch {batch_size}, {spec.model.input_size} px, "
          f"{args.repeats} repeats (medians)")
    for name, value in median.items():
        print(f"  {name:16s} {value:7.1f} ms per batch")
    print(f"model step NHWC speed-up: {median['NCHW'] / median['NHWC']:.2f}x")
    print(f"inference NHWC speed-up:  {median['infer NCHW'] / median['infer NHWC']:.2f}x")
    print(f"data cache speed-up:      {median['data, no cache'] / median['data, cache']:.2f}x")
    before = median["NCHW"] + median["data, no cache"]
    after = median["NHWC"] + median["data, cache"]
    print(f"whole step (in-process data): {before:.0f} -> {after:.0f} ms, {before / after:.2f}x")


if __name__ == "__main__":
    main()
