"""The `pathssl` command line. Each command loads its spec and calls a typed `run_<command>(spec)`; nothing else.

Exit codes: 0 success; 1 the work ran but failed; 2 the spec or the arguments are invalid (nothing started).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pathssl_cli import __version__
from pathssl_cli.cli_common import SET_HELP, PathsslGroup, limit_cpu_threads, load_command_spec, spec_argument
from pathssl_cli.cli_segment import segment
from pathssl_cli.cli_synthetic import synthetic


@click.group(cls=PathsslGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pathssl")
@click.option("--force", is_flag=True,
              help="A run directory that holds a run of a different spec is moved aside (<dir>.replaced-<time>) "
                   "and a new run starts, instead of being refused.")
@click.option("--threads", type=click.IntRange(min=1), envvar="PATHSSL_THREADS", show_envvar=True,
              help="CPU threads for torch and OpenCV in this process (default: one per core). Use 1 on a machine "
                   "shared with other jobs: oversubscribed threads can make CPU training 10x slower.")
def cli(force: bool, threads: int | None) -> None:
    """Self-supervised learning on pathology images: slides → tiles → pretrained backbones → benchmark tables.

    \b
    Start with:  pathssl demo            (the whole study on synthetic data, a few minutes on a CPU)
    Specs:       pathssl spec validate specs/**/*.toml
    """
    if force:
        from pathssl_cli.runs import FORCE_REPLACE

        token = FORCE_REPLACE.set(True)  # for this invocation only (a library caller may invoke the CLI twice)
        click.get_current_context().call_on_close(lambda: FORCE_REPLACE.reset(token))
    if threads is not None:
        limit_cpu_threads(threads)


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
                loaded = load_spec(file, overrides, check_inputs=not no_input_check)
                what = getattr(loaded, "kind", "?")
                if what == "study" and not no_input_check:  # the grid is checked by the planner
                    from pathssl_cli.study import plan_problems

                    if problems := plan_problems(loaded):  # type: ignore[arg-type]
                        raise SpecError(problems)
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
              help="Split the slide list into N disjoint parts (one per machine); torchrun's ranks split each part.")
@click.option("--shard-index", type=click.IntRange(min=0), default=None, help="Which part this process tiles.")
@click.option("--split-array", is_flag=True,
              help="Take this SLURM array task's part of the slides (SLURM_ARRAY_TASK_ID/COUNT). Without it an "
                   "array task tiles every slide (an array over specs).")
@click.option("--consolidate", is_flag=True,
              help="Afterwards write manifest.parquet + manifest.csv from all parts (once, after all array tasks).")
@click.option("--force-reader", is_flag=True,
              help="Continue a store tiled with another input.reader (its slides keep theirs): mixes readers.")
@click.option("--coords-only", is_flag=True,
              help="Write only the slides' coordinate index (output.dir/coords/: tissue grid, MPP, reader) for "
                   "`pretrain` with data.slides and data.coords_dir = output.dir; no tiles.")
def tile(spec: Path, overrides: tuple[str, ...], num_shards: int | None, shard_index: int | None,
         split_array: bool, consolidate: bool, force_reader: bool, coords_only: bool) -> None:
    """Tile whole-slide images at one or more fields of view (µm/px) into WebDataset shards + a Parquet index.

    \b
    Example:  pathssl tile specs/tile/tcga_two_fov.toml --set input.slides='["slides/*.svs"]'
    SLURM:    sbatch --array=0-99 --wrap "pathssl tile spec.toml --split-array"
              then once:  pathssl tile spec.toml --consolidate
    Slides:   sbatch --array=0-99 --wrap "pathssl tile spec.toml --coords-only --split-array"   (pre-train from
              the slides), then once:  pathssl tile spec.toml --coords-only --consolidate
    """
    from pathssl_cli.sharding import resolve_shard

    resolve_shard(num_shards, shard_index, array=split_array)  # a bad split is exit 2 before the spec is read
    loaded = load_command_spec(spec, overrides, "tile")
    from pathssl_cli.tiling.tiler import run_coords, run_tile

    if coords_only:
        run_coords(loaded, num_shards=num_shards, shard_index=shard_index, consolidate=consolidate,
                   split_array=split_array)
    else:
        run_tile(loaded, num_shards=num_shards, shard_index=shard_index, consolidate=consolidate,
                 split_array=split_array, force_reader=force_reader)


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
@click.option("--mpp-override", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Level-0 µm/px to use over the metadata's (as tile's input.mpp_override and predict's "
                   "predict.mpp_override); the metadata's value is still shown.")
def slides_info(paths: tuple[str, ...], reader: str, as_json: bool, out_csv: Path | None,
                mpp_override: float | None) -> None:
    """Format, reader, levels, MPP and its source, objective, compression, associated images, size; exit 1 if
    any slide is unreadable. Reads metadata only.

    \b
    Example:  pathssl slides info 'slides/**/*.svs' dicom_series/ --csv slides.csv
    """
    from pathssl_cli.slides.info import write_slides_info

    write_slides_info(list(paths), reader=reader, as_json=as_json, out_csv=out_csv, mpp_override=mpp_override)


# ----------------------------------------------------------------------------------------------- pretrain
@cli.command()
@spec_argument
def pretrain(spec: Path, overrides: tuple[str, ...]) -> None:
    """Self-supervised pre-training (MoCo v2, SwAV, Barlow Twins, DINO) on tile stores or image folders.

    \b
    Example:  pathssl pretrain specs/pretrain/tiny_dino.toml --set data.tiles='["runs/tiles"]'
    Multi-GPU: torchrun --nproc-per-node 8 -m pathssl_cli pretrain specs/pretrain/dino_vits16_pathology.toml
    """
    loaded = load_command_spec(spec, overrides, "pretrain")
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
    loaded = load_command_spec(spec, overrides, "linear")
    from pathssl_cli.evaluate.linear import run_linear

    run_linear(loaded)


@evaluate.command("finetune")
@spec_argument
def evaluate_finetune(spec: Path, overrides: tuple[str, ...]) -> None:
    """Fine-tune the whole network with a new head; early stopping on validation.

    \b
    Example:  pathssl evaluate finetune specs/evaluate/mhist_finetune.toml --set data.root=data/mhist
    """
    loaded = load_command_spec(spec, overrides, "finetune")
    from pathssl_cli.evaluate.finetune import run_finetune

    run_finetune(loaded)


@evaluate.command("knn")
@spec_argument
def evaluate_knn(spec: Path, overrides: tuple[str, ...]) -> None:
    """Weighted kNN (k = 20, 200; T = 0.07) on L2-normalised frozen features, as in DINO.

    \b
    Example:  pathssl evaluate knn specs/evaluate/pcam_knn.toml --set data.root=data/pcam
    """
    loaded = load_command_spec(spec, overrides, "knn")
    from pathssl_cli.evaluate.knn import run_knn

    run_knn(loaded)


@cli.command()
@spec_argument
def subsample(spec: Path, overrides: tuple[str, ...]) -> None:
    """Write seeded, stratified, nested low-label subsets (e.g. 1% ⊂ 10% ⊂ 100%).

    \b
    Example:  pathssl subsample specs/subsample/crc_low_label.toml --set data.root=data/crc
    """
    loaded = load_command_spec(spec, overrides, "subsample")
    from pathssl_cli.data.subsample import run_subsample

    run_subsample(loaded)


# --------------------------------------------------------------------------------------------------- study
@cli.command()
@spec_argument
@click.option("--dry-run", is_flag=True, help="Print every run, its command line and whether it is done, failed "
                                              "or pending; run nothing.")
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="Run run I alone (and the pre-training and subsets it needs); default: $SLURM_ARRAY_TASK_ID "
                   "when set.")
@click.option("--stage", type=click.Choice(["pretrain", "evaluate"]), default=None,
              help="Only the runs of this stage: 'pretrain' (the [[pretrains]] runs, first) or 'evaluate' (the "
                   "rest; a run whose pre-training is not done fails without starting).")
@click.option("--emit-slurm", type=click.Path(path_type=Path), default=None,
              help="Write a SLURM array job script with one task per run ([slurm] of the spec) and exit; with "
                   "[[pretrains]], a second script for the pre-training array, submitted first.")
@click.option("--report-only", is_flag=True, help="Write the tables from whatever has finished; run nothing.")
@click.option("--force", is_flag=True, help="Runs whose directory holds a run of a different spec are moved "
                                            "aside and run again, instead of refused.")
def study(spec: Path, overrides: tuple[str, ...], dry_run: bool, index: int | None, stage: str | None,
          emit_slurm: Path | None, report_only: bool, force: bool) -> None:
    """Pre-train, then run a grid of evaluations and segmentations over backbones, label fractions, seeds and
    folds, then the tables (mean ± std, 95% intervals, paired differences against [tables] reference).

    \b
    Example:  pathssl study specs/study/tiny.toml --dry-run
              pathssl study specs/study/paper_classification.toml --emit-slurm study.sbatch
    """
    loaded = load_command_spec(spec, overrides, "study")
    from pathssl_cli.study import run_study

    code = run_study(loaded, dry_run=dry_run, index=index, emit_slurm=emit_slurm, report_only=report_only,
                     force=force, overrides=overrides, stage=stage)
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


cli.add_command(segment)
cli.add_command(synthetic)


def main() -> None:
    cli(prog_name="pathssl")


if __name__ == "__main__":
    main()
