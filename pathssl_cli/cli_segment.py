"""`pathssl segment train|eval|predict|score|folds`: thin commands over `pathssl_cli.segment`."""

from __future__ import annotations

from pathlib import Path

import click

from pathssl_cli.cli_common import load_command_spec, spec_argument


@click.group()
def segment() -> None:
    """HoVer-Net nuclei instance segmentation on the registry's backbones, and its metrics."""


@segment.command("train")
@spec_argument
def segment_train(spec: Path, overrides: tuple[str, ...]) -> None:
    """Train HoVer-Net: frozen encoder, then the whole network.

    \b
    Example:  pathssl segment train specs/segment/consep_resnet50.toml --set data.root=data/consep
    """
    loaded = load_command_spec(spec, overrides, "segment")
    from pathssl_cli.segment.train import run_segment_train

    run_segment_train(loaded)


@segment.command("eval")
@spec_argument
def segment_eval(spec: Path, overrides: tuple[str, ...]) -> None:
    """Predict the evaluation split, post-process, and score (PQ, AJI, Dice; mPQ/bPQ on PanNuke).

    \b
    Example:  pathssl segment eval specs/segment/pannuke_resnet50.toml
    """
    loaded = load_command_spec(spec, overrides, "segment")
    from pathssl_cli.segment.evaluate import run_segment_eval

    run_segment_eval(loaded)


@segment.command("predict")
@spec_argument
@click.option("--num-shards", type=click.IntRange(min=1), default=None,
              help="Split the inputs into N disjoint parts (one per machine); torchrun's ranks split each part.")
@click.option("--shard-index", type=click.IntRange(min=0), default=None, help="Which part this process predicts.")
@click.option("--split-array", is_flag=True,
              help="Take this SLURM array task's part of the inputs (SLURM_ARRAY_TASK_ID/COUNT). Without it an "
                   "array task predicts every input (an array over specs).")
def segment_predict(spec: Path, overrides: tuple[str, ...], num_shards: int | None, shard_index: int | None,
                    split_array: bool) -> None:
    """Segment nuclei in images or whole-slide regions with overlapping tiles and bounded memory.

    \b
    Example:  pathssl segment predict specs/segment/tiny.toml --set predict.inputs='["slide.svs"]'
    SLURM:    sbatch --array=0-9 --wrap "pathssl segment predict spec.toml --split-array"
    """
    from pathssl_cli.sharding import resolve_shard

    resolve_shard(num_shards, shard_index, array=split_array)  # a bad split is exit 2 before the spec is read
    loaded = load_command_spec(spec, overrides, "segment")
    from pathssl_cli.segment.predict import run_segment_predict

    run_segment_predict(loaded, num_shards=num_shards, shard_index=shard_index, split_array=split_array)


@segment.command("score")
@click.option("--true", "true_path", required=True, type=click.Path(path_type=Path),
              help="Ground-truth instance maps: a file or a folder.")
@click.option("--pred", "pred_path", required=True, type=click.Path(path_type=Path),
              help="Predicted instance maps: a file or a folder, paired with --true by file name.")
@click.option("--format", "fmt", type=click.Choice(["auto", "generic", "consep", "pannuke"]), default="auto",
              show_default=True, help="Layout of the maps.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (per_image and mean) instead of a table.")
@click.option("--csv", "out_csv", type=click.Path(path_type=Path), default=None, help="Write per-image CSV here.")
@click.option("--match-iou", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.5,
              show_default=True, help="IoU above which a prediction matches a true instance (PQ).")
def segment_score(true_path: Path, pred_path: Path, fmt: str, as_json: bool, out_csv: Path | None,
                  match_iou: float) -> None:
    """Score instance maps from any tool with Dice, AJI, AJI+, DQ, SQ, PQ (and mPQ/bPQ for PanNuke).

    \b
    Example:  pathssl segment score --true data/consep/Labels --pred runs/seg/pred --json
    """
    from pathssl_cli.segment.score import run_score

    run_score(true_path, pred_path, fmt=fmt, as_json=as_json, out_csv=out_csv, match_iou=match_iou)


@segment.command("folds")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a markdown table.")
def segment_folds(run_dirs: tuple[Path, ...], as_json: bool) -> None:
    """PanNuke three-fold protocol: each rotation's scores and their mean ± std (from each run's metrics.json).

    \b
    Example:  pathssl segment folds runs/segment/pannuke_resnet50_fold1 runs/segment/pannuke_resnet50_fold2 \\
                runs/segment/pannuke_resnet50_fold3
    """
    import json

    from pathssl_cli.segment.folds import fold_summary, format_summary

    summary = fold_summary(list(run_dirs))
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
