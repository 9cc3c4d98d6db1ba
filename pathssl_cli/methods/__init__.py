"""SSL methods: one file per method (options, loss as a pure function, the `SSLMethod`), one registry.

Adding a method: a file with `@METHODS.register("<name>")` on its `SSLMethod` subclass, its import below, and
its options class in `MethodOptionsUnion`.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from pathssl_cli.backbones import Backbone
from pathssl_cli.methods.barlow_twins import BarlowTwins, BarlowTwinsOptions, barlow_twins_loss
from pathssl_cli.methods.base import METHODS, MethodOptions, SSLMethod
from pathssl_cli.methods.dino import DINO, DINOOptions, dino_loss, update_center
from pathssl_cli.methods.dinov2 import DINOv2
from pathssl_cli.methods.dinov2_options import DINOv2Options
from pathssl_cli.methods.mocov2 import MoCoV2, MoCoV2Options, infonce_loss
from pathssl_cli.methods.swav import SwAV, SwAVOptions, sinkhorn_knopp, swav_loss

#: The `[method]` table of a pretrain spec: the options model picked by `name`.
MethodOptionsUnion = Annotated[
    Union[MoCoV2Options, SwAVOptions, BarlowTwinsOptions, DINOOptions, DINOv2Options],  # noqa: UP007 - pydantic discriminator
    Field(discriminator="name"),
]


def create_method(backbone: Backbone, options: MethodOptions, *, steps_per_epoch: int,
                  total_steps: int) -> SSLMethod:
    """The registered method for `options.name`, built around `backbone` (the student that gets exported)."""
    method_class = METHODS.get(options.name)
    return method_class(backbone, options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


__all__ = [
    "DINO", "METHODS", "BarlowTwins", "BarlowTwinsOptions", "DINOOptions", "DINOv2", "DINOv2Options",
    "MethodOptions",
    "MethodOptionsUnion",
    "MoCoV2", "MoCoV2Options", "SSLMethod", "SwAV", "SwAVOptions", "barlow_twins_loss", "create_method",
    "dino_loss", "infonce_loss", "sinkhorn_knopp", "swav_loss", "update_center",
]
