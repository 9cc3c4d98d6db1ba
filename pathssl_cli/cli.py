"""The `pathssl` command line. Each command loads its spec and calls a typed `run_<command>(spec)`; nothing else.

Exit codes: 0 success; 1 the work ran but failed; 2 the spec or the arguments are invalid (nothing started).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from pathssl_cli import __version__
from pathssl_cli.errors import PathsslError

SET_HELP = "Override a spec value, parsed as TOML: --set tiles.mpp=[0.25,0.5]. Repeatable."


class PathsslGroup(click.Group):
    """Turns pathssl's user-facing errors into a message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PathsslError as exc:
            if os.environ.get("RANK", "0") == "0":
                click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if os.environ.get("PATHSSL_DEBUG"):
                raise
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            click.echo(f"error: unexpected failure: {detail}\n(set PATHSSL_DEBUG=1 to see the traceback; "
                       "please report it with the spec you ran)", err=True)
            ctx.exit(1)


def spec_argument(func: Any) -> Any:
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(func)
    return click.argument("spec", type=click.Path(path_type=Path))(func)


def _load(spec: Path, overrides: tuple[str, ...], kind: str) -> Any:
    from pathssl_cli.specs import load_spec

    return load_spec(spec, overrides, kind=kind)


@click.group(cls=PathsslGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pathssl")
@click.option("--force", is_flag=True,
              help="A run directory that holds a run of a different spec is moved aside (<dir>.replaced-<time>) "
                   "and a new run starts, instead of being refused.")
def cli(force: bool) -> None:
    """Self-supervised learning on pathology images: slides → tiles → pretrained backbones → benchmark tables.

    \b
    Start with:  pathssl demo            (the whole study on synthetic data, a few minutes on a CPU)
    Specs:       pathssl spec validate specs/**/*.toml
    """
    if force:
        from pathssl_cli.runs import FORCE_REPLACE

        FORCE_REPLACE.set(True)


# ----------------------------------------------------------------------------------------------------- spec
@cli.group()
def spec() -> None:
    """Validate, inspect and export the schema of TOML specs."""


@spec.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-input-check", is_flag=True,
              help="Check structure and values only, not that input files exist (CI without the data).")
def spec_validate(files: tuple[Path, ...], overrides: tuple[str, ...], no_input_check: bool) -> None:
    """Check spec files (a folder means every *.toml below it); exit 0 when all are valid, 2 otherwise.

    Partial specs that exist only to be extended are named with a leading underscore (_base.toml). Wherever
    they are named (a folder, a shell glob, one by one) they are checked as partials: every key and value they
    set, but not the required fields they leave to the specs that extend them, nor their input files.

    \b
    Example:  pathssl spec validate specs/
              pathssl spec validate --no-input-check specs/    (on a machine without the datasets)
    """
    from pathssl_cli.errors import SpecError
    from pathssl_cli.specs import is_partial, load_spec, validate_partial

    given = files
    files = tuple(found for file in files for found in (sorted(file.rglob("*.toml")) if file.is_dir() else [file]))
    if not files:
        raise click.UsageError("no .toml spec files found in " + ", ".join(str(f) for f in given))
    failed = 0
    for file in files:
        try:
            if is_partial(file):
                kind = validate_partial(file, overrides)
                what = f"partial {kind} base" if kind else "partial base without a kind"
            else:
                what = getattr(load_spec(file, overrides, check_inputs=not no_input_check), "kind", "?")
        except SpecError as exc:
            failed += 1
            click.echo(f"invalid: {file}\n" + "\n".join(f"  {p}" for p in exc.problems), err=True)
        else:
            click.echo(f"ok: {file} ({what})")
    if failed:
        click.echo(f"{failed} of {len(files)} specs invalid", err=True)
        sys.exit(2)


@spec.command("schema")
@click.argument("kind")
def spec_schema_command(kind: str) -> None:
    """Print the JSON Schema of a spec kind (for editors' TOML plugins).

    \b
    Example:  pathssl spec schema pretrain > pretrain.schema.json
    """
    from pathssl_cli.specs import spec_schema

    click.echo(spec_schema(kind))


@spec.command("show")
@spec_argument
@click.option("--no-input-check", is_flag=True,
              help="Resolve without checking that input files exist (a machine without the data).")
def spec_show(spec: Path, overrides: tuple[str, ...], no_input_check: bool) -> None:
    """Print the resolved spec (after extends and --set), as each run saves it in spec.toml.

    \b
    Example:  pathssl spec show specs/pretrain/tiny_dino.toml --set optim.lr=0.001
              pathssl spec show --no-input-check specs/evaluate/pcam_linear.toml
    """
    from pathssl_cli.specs import load_spec, spec_to_toml

    click.echo(spec_to_toml(load_spec(spec, overrides, check_inputs=not no_input_check)), nl=False)


# ------------------------------------------------------------------------------------------------ backbones
@cli.group()
def backbones() -> None:
    """The backbone registry shared by every command."""


@backbones.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones_list(as_json: bool) -> None:
    """List backbones: parameters, feature dimension, patch size, default normalisation.

    \b
    Example:  pathssl backbones list --json
    """
    from pathssl_cli.backbones import describe_backbones

    rows = describe_backbones()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':24} {'params':>10} {'dim':>5} {'patch':>5}  {'norm':9} description")
    for r in rows:
        click.echo(f"{r['name']:24} {r['params'] / 1e6:9.2f}M {r['feature_dim']:5d} {r['patch_size'] or '-':>5}  "
                   f"{r['normalization']:9} {r['description']}")
    click.echo("Any timm model: 'timm:<name>'. Weights: 'random' or a local file (Lunit, torchvision, timm, pathssl).")


# --------------------------------------------------------------------------------------------------- tile
@cli.command()
@spec_argument
@click.option("--num-shards", type=click.IntRange(min=1), default=None,
              help="Split the slide list into N disjoint parts (one per machine or array job). Without it a SLURM "
                   "job array (SLURM_ARRAY_TASK_ID/COUNT) or torchrun's RANK/WORLD_SIZE splits it.")
@click.option("--shard-index", type=click.IntRange(min=0), default=None, help="Which part this process tiles.")
@click.option("--consolidate", is_flag=True,
              help="Afterwards write manifest.parquet + manifest.csv from all parts (once, after all array tasks).")
def tile(spec: Path, overrides: tuple[str, ...], num_shards: int | None, shard_index: int | None,
         consolidate: bool) -> None:
    """Tile whole-slide images at one or more fields of view (µm/px) into WebDataset shards + a Parquet index.

    \b
    Example:  pathssl tile specs/tile/tcga_two_fov.toml --set input.slides='["slides/*.svs"]'
    SLURM:    sbatch --array=0-99 --wrap "pathssl tile spec.toml"   then once:  pathssl tile spec.toml --consolidate
    """
    from pathssl_cli.sharding import resolve_shard

    resolve_shard(num_shards, shard_index)  # a bad split is exit 2 before the spec is even read
    loaded = _load(spec, overrides, "tile")
    from pathssl_cli.tiling.tiler import run_tile

    run_tile(loaded, num_shards=num_shards, shard_index=shard_index, consolidate=consolidate)


# ------------------------------------------------------------------------------------------------- slides
@cli.group()
def slides() -> None:
    """Inspect whole-slide images before tiling them."""


@slides.command("info")
@click.argument("paths", nargs=-1, required=True)
@click.option("--reader", type=click.Choice(["auto", "tiffslide", "openslide", "dicom"]), default="auto",
              show_default=True, help="Slide library (auto: tiffslide, then OpenSlide, then DICOM).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per slide.")
@click.option("--csv", "out_csv", type=click.Path(path_type=Path), default=None,
              help="Write one CSV row per slide to this file ('-' for standard output).")
def slides_info(paths: tuple[str, ...], reader: str, as_json: bool, out_csv: Path | None) -> None:
    """Format, reader, levels, MPP and its source, objective, compression, associated images, size; exit 1 if
    any slide is unreadable. Reads metadata only.

    \b
    Example:  pathssl slides info 'slides/**/*.svs' dicom_series/ --csv slides.csv
    """
    from pathssl_cli.slides.info import write_slides_info

    write_slides_info(list(paths), reader=reader, as_json=as_json, out_csv=out_csv)


# ----------------------------------------------------------------------------------------------- pretrain
@cli.command()
@spec_argument
def pretrain(spec: Path, overrides: tuple[str, ...]) -> None:
    """Self-supervised pre-training (MoCo v2, SwAV, Barlow Twins, DINO) on tile stores or image folders.

    \b
    Example:  pathssl pretrain specs/pretrain/tiny_dino.toml --set data.tiles='["runs/tiles"]'
    Multi-GPU: torchrun --nproc-per-node 8 -m pathssl_cli pretrain specs/pretrain/dino_vits16_pathology.toml
    """
    loaded = _load(spec, overrides, "pretrain")
    from pathssl_cli.pretrain import run_pretrain

    run_pretrain(loaded)


# ----------------------------------------------------------------------------------------------- evaluate
@cli.group()
def evaluate() -> None:
    """Downstream protocols: linear probing, fine-tuning and kNN on BACH, CRC, PCam, MHIST or your data."""


@evaluate.command("linear")
@spec_argument
def evaluate_linear(spec: Path, overrides: tuple[str, ...]) -> None:
    """Linear probe on cached frozen features, with an lr/weight-decay sweep and several seeds.

    \b
    Example:  pathssl evaluate linear specs/evaluate/crc_linear.toml --set model.weights=runs/dino/backbone.safetensors
    """
    loaded = _load(spec, overrides, "linear")
    from pathssl_cli.evaluate.linear import run_linear

    run_linear(loaded)


@evaluate.command("finetune")
@spec_argument
def evaluate_finetune(spec: Path, overrides: tuple[str, ...]) -> None:
    """Fine-tune the whole network with a new head; early stopping on validation.

    \b
    Example:  pathssl evaluate finetune specs/evaluate/mhist_finetune.toml --set data.root=data/mhist
    """
    loaded = _load(spec, overrides, "finetune")
    from pathssl_cli.evaluate.finetune import run_finetune

    run_finetune(loaded)


@evaluate.command("knn")
@spec_argument
def evaluate_knn(spec: Path, overrides: tuple[str, ...]) -> None:
    """Weighted kNN (k = 20, 200; T = 0.07) on L2-normalised frozen features, as in DINO.

    \b
    Example:  pathssl evaluate knn specs/evaluate/pcam_knn.toml --set data.root=data/pcam
    """
    loaded = _load(spec, overrides, "knn")
    from pathssl_cli.evaluate.knn import run_knn

    run_knn(loaded)


@cli.command()
@spec_argument
def subsample(spec: Path, overrides: tuple[str, ...]) -> None:
    """Write seeded, stratified, nested low-label subsets (e.g. 1% ⊂ 10% ⊂ 100%).

    \b
    Example:  pathssl subsample specs/subsample/crc_low_label.toml --set data.root=data/crc
    """
    loaded = _load(spec, overrides, "subsample")
    from pathssl_cli.data.subsample import run_subsample

    run_subsample(loaded)


# ------------------------------------------------------------------------------------------------ segment
@cli.group()
def segment() -> None:
    """HoVer-Net nuclei instance segmentation on the registry's backbones, and its metrics."""


@segment.command("train")
@spec_argument
def segment_train(spec: Path, overrides: tuple[str, ...]) -> None:
    """Train HoVer-Net: frozen encoder, then the whole network.

    \b
    Example:  pathssl segment train specs/segment/consep_resnet50.toml --set data.root=data/consep
    """
    loaded = _load(spec, overrides, "segment")
    from pathssl_cli.segment.train import run_segment_train

    run_segment_train(loaded)


@segment.command("eval")
@spec_argument
def segment_eval(spec: Path, overrides: tuple[str, ...]) -> None:
    """Predict the evaluation split, post-process, and score (PQ, AJI, Dice; mPQ/bPQ on PanNuke).

    \b
    Example:  pathssl segment eval specs/segment/pannuke_resnet50.toml
    """
    loaded = _load(spec, overrides, "segment")
    from pathssl_cli.segment.evaluate import run_segment_eval

    run_segment_eval(loaded)


@segment.command("predict")
@spec_argument
@click.option("--num-shards", type=click.IntRange(min=1), default=None,
              help="Split the inputs into N disjoint parts (else SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE).")
@click.option("--shard-index", type=click.IntRange(min=0), default=None, help="Which part this process predicts.")
def segment_predict(spec: Path, overrides: tuple[str, ...], num_shards: int | None, shard_index: int | None) -> None:
    """Segment nuclei in images or whole-slide regions with overlapping tiles and bounded memory.

    \b
    Example:  pathssl segment predict specs/segment/tiny.toml --set predict.inputs='["slide.svs"]'
    """
    from pathssl_cli.sharding import resolve_shard

    resolve_shard(num_shards, shard_index)  # a bad split is exit 2 before the spec is even read
    loaded = _load(spec, overrides, "segment")
    from pathssl_cli.segment.predict import run_segment_predict

    run_segment_predict(loaded, num_shards=num_shards, shard_index=shard_index)


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


# --------------------------------------------------------------------------------------------------- study
@cli.command()
@spec_argument
@click.option("--dry-run", is_flag=True, help="Print every run, its command line and whether it is done, failed "
                                              "or pending; run nothing.")
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="Run run I alone (and the subsets it needs); default: $SLURM_ARRAY_TASK_ID when set.")
@click.option("--emit-slurm", type=click.Path(path_type=Path), default=None,
              help="Write a SLURM array job script with one task per run ([slurm] of the spec) and exit.")
@click.option("--report-only", is_flag=True, help="Write the tables from whatever has finished; run nothing.")
@click.option("--force", is_flag=True, help="Runs whose directory holds a run of a different spec are moved "
                                            "aside and run again, instead of refused.")
def study(spec: Path, overrides: tuple[str, ...], dry_run: bool, index: int | None, emit_slurm: Path | None,
          report_only: bool, force: bool) -> None:
    """Run a grid of evaluations and segmentations over backbones, label fractions and seeds, then the tables.

    \b
    Example:  pathssl study specs/study/tiny.toml --dry-run
              pathssl study specs/study/paper_classification.toml --emit-slurm study.sbatch
    """
    loaded = _load(spec, overrides, "study")
    from pathssl_cli.study import run_study

    code = run_study(loaded, dry_run=dry_run, index=index, emit_slurm=emit_slurm, report_only=report_only,
                     force=force, overrides=overrides)
    if code:
        sys.exit(code)


# ------------------------------------------------------------------------------------------- report, demo
@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output file for the markdown table (CSV and PNG are written beside it).")
@click.option("--metric", type=click.Choice(["top1", "balanced_acc", "macro_f1", "auroc"]), default="top1",
              show_default=True, help="Metric in the table (top-1 is what the paper reports).")
def report(run_dirs: tuple[Path, ...], out: Path | None, metric: str) -> None:
    """Gather metrics.json files into the paper-style table (markdown + CSV) and a bar chart.

    \b
    Example:  pathssl report runs/eval/* --out results/table.md
    """
    from pathssl_cli.report import run_report

    run_report(list(run_dirs), out, metric=metric)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("pathssl-demo"), show_default=True,
              help="Directory for the demo's specs, runs and report.")
@click.option("--method", type=click.Choice(["mocov2", "dino", "swav", "barlow_twins"]), default="mocov2",
              show_default=True, help="SSL method to pre-train (MoCo v2 learns fastest on a CPU).")
def demo(out: Path, method: str) -> None:
    """Run the whole study end to end on synthetic slides: tile, pretrain, evaluate, segment, report.

    \b
    Example:  pathssl demo --out pathssl-demo --method barlow_twins
    """
    from pathssl_cli.demo import run_demo

    run_demo(out, method=method)


# -------------------------------------------------------------------------------------------- synthetic
@cli.group()
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


def main() -> None:
    cli(prog_name="pathssl")


if __name__ == "__main__":
    main()
