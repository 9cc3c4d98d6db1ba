"""`pathssl synthetic slides|tiles|nuclei`: synthetic H&E-like data with known truth, in the official layouts."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def synthetic() -> None:
    """Synthetic H&E-like data with known truth, in official layouts: for trying pathssl and for CI."""


@synthetic.command("slides")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--count", type=click.IntRange(1, 100), default=2, show_default=True)
@click.option("--size", type=click.IntRange(512, 200_000), default=4096, show_default=True, help="Side in px.")
@click.option("--mpp", type=click.FloatRange(0.05, 10), default=0.25, show_default=True, help="µm/px of level 0.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--corrupt", is_flag=True, help="Also write a truncated slide, to exercise error handling.")
def synthetic_slides(out: Path, count: int, size: int, mpp: float, seed: int, corrupt: bool) -> None:
    """Pyramidal tiled-JPEG TIFF slides with MPP metadata.

    \b
    Example:  pathssl synthetic slides data/slides --count 4 --size 8192
    """
    from pathssl_cli.synthetic_sets import write_slides

    for path in write_slides(out, count=count, size=size, mpp=mpp, seed=seed, corrupt=corrupt):
        click.echo(path)


@synthetic.command("tiles")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--per-class", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True, help="Tile side in px.")
@click.option("--seed", type=int, default=0, show_default=True)
def synthetic_tiles(out: Path, per_class: int, size: int, seed: int) -> None:
    """Labelled tissue tiles as an ImageFolder (train/val/test/<class>/*.png).

    \b
    Example:  pathssl synthetic tiles data/tiles --per-class 50 --size 96
    """
    from pathssl_cli.synthetic import write_image_folder

    click.echo(write_image_folder(out, per_class, size, seed))


@synthetic.command("nuclei")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--count", type=click.IntRange(1, 100_000), default=8, show_default=True)
@click.option("--size", type=click.IntRange(32, 2048), default=128, show_default=True, help="Image side in px.")
@click.option("--seed", type=int, default=0, show_default=True)
def synthetic_nuclei(out: Path, count: int, size: int, seed: int) -> None:
    """Nuclei images with instance and type labels in CoNSeP's layout (Images/*.png, Labels/*.mat).

    \b
    Example:  pathssl synthetic nuclei data/nuclei --count 16 --size 256
    """
    from pathssl_cli.synthetic_sets import write_consep_like

    click.echo(write_consep_like(out, n_images=count, size=size, seed=seed))
