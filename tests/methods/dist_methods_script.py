"""Run under `python -m torch.distributed.run --nproc-per-node 2 --standalone dist_methods_script.py OUT_DIR`:
every method for a few steps under DDP (gloo), rank 0 saving losses, averaged gradients and final state to
OUT_DIR/<method>.pt for tests/methods/test_methods_distributed.py to compare with one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_common import GLOBAL_BATCH, METHOD_NAMES, N_STEPS, dinov2_pure_case, run_steps, shuffle_bn_case


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in METHOD_NAMES:
        result = run_steps(name, rank, world, wrap=DistributedDataParallel)
        if rank == 0:
            torch.save(result, out_dir / f"{name}.pt")
    pure = dinov2_pure_case(rank, world)
    if rank == 0:
        torch.save(pure, out_dir / "dinov2_pure.pt")
    method, images = shuffle_bn_case()  # keys of each rank's images, encoded after shuffle-BN, gathered
    local = GLOBAL_BATCH // world
    keys = []
    for step in range(N_STEPS):
        mine = method._key(images[rank * local:(rank + 1) * local], step)  # type: ignore[operator]
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        keys.append(torch.cat(gathered))
    if rank == 0:
        torch.save(keys, out_dir / "shuffle_bn.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
