"""`pathssl study` with [[pretrains]] and study.folds: the plan, its checks, SLURM stages, and one tiny study run
end to end (pre-training, group K-fold evaluations, tables with paired differences)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from pathssl_cli.cli import cli

SPECS = Path(__file__).resolve().parents[1] / "specs"

LINEAR = """kind = "linear"
[data]
dataset = "csv"
root = "{csv}"
[model]
backbone = "resnet_tiny"
img_size = 32
[features]
normalize = true
[probe]
kind = "lbfgs"
cs = [0.1, 10.0]
[run]
output_dir = "unused"
device = "cpu"
workers = 0
batch_size = 64
"""

# 2 presets × 2 pre-training seeds, evaluated on 3 slide folds by the L-BFGS probe, plus random init.
STUDY = """kind = "study"
[study]
name = "t"
output_root = "out"
seeds = [0, 1]
folds = 3
pretrain_set = ['data.tiles=["{tiles}"]', "augment.global_size=32", "augment.stain_fit_tiles=16",
                "data.batch_size=16", "run.steps=2", "run.log_every=1", "run.checkpoint_every=1"]
[[pretrains]]
name = "original"
spec = "{specs}/pretrain/tiny_mocov2.toml"
set = ["augment.preset='original'"]
[[pretrains]]
name = "pathology"
spec = "{specs}/pretrain/tiny_mocov2.toml"
set = ["augment.preset='pathology'"]
[[backbones]]
name = "random"
backbone = "resnet_tiny"
[[backbones]]
name = "original"
pretrain = "original"
[[backbones]]
name = "pathology"
pretrain = "pathology"
[[evaluations]]
spec = "linear.toml"
name = "linear"
[tables]
reference = "original"
[slurm]
gpus = 0
{more}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiles folder, csv with a `group` column: 4 'slides' of 9 images, 6 per texture class)."""
    from pathssl_cli.synthetic import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("pretrain_study") / "tiles", 6, 32, seed=0, splits=("train",))
    images = sorted((root / "train").rglob("*.png"))
    table = root / "items.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group"])
        writer.writerows([p.relative_to(root), p.parent.name, f"slide{i % 4}"] for i, p in enumerate(images))
    return root, table


def write_study(folder: Path, data: tuple[Path, Path], more: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "linear.toml").write_text(LINEAR.format(csv=data[1]))
    path = folder / "study.toml"
    path.write_text(STUDY.format(tiles=data[0], specs=SPECS, more=more))
    return path


def study(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["study", *args])
    return result.exit_code, result.output


def statuses(path: Path) -> dict[str, str]:
    code, output = study(str(path), "--dry-run")
    assert code == 0, output
    return {line.split()[2]: line.split()[1] for line in output.splitlines() if line.startswith("[")}


def test_plan_pretrains_first_then_every_fold_of_every_seed(data: tuple[Path, Path], tmp_path: Path) -> None:
    from pathssl_cli.backbones import create_backbone, export_backbone
    from pathssl_cli.specs import load_spec
    from pathssl_cli.study import build_plan

    export_backbone(create_backbone("resnet_tiny", img_size=32), tmp_path / "w.safetensors")
    more = f"""[[backbones]]
name = "file"
backbone = "resnet_tiny"
weights = "{tmp_path / 'w.safetensors'}"
[[evaluations]]
spec = "{SPECS}/evaluate/tiny_knn.toml"
name = "knn"
"""
    path = write_study(tmp_path, data, more)
    plan = build_plan(load_spec(path))
    names = [run.name for run in plan.runs]
    assert names[:4] == ["pretrain/original__seed0", "pretrain/original__seed1", "pretrain/pathology__seed0",
                         "pretrain/pathology__seed1"]
    assert {run.stage for run in plan.runs[:4]} == {"pretrain"} and {r.stage for r in plan.runs[4:]} == {"evaluate"}
    # linear: (random, original, pathology) × 2 seeds × 3 folds, and the weights file once per fold: the
    # L-BFGS probe is deterministic, so its other seeds would repeat the same number.
    linear = [r for r in plan.runs if r.entry == "linear"]
    assert len(linear) == 3 * 2 * 3 + 1 * 3
    assert sorted(r.name for r in linear if r.backbone == "file") == [
        f"linear__file__all__fold{k}__seed0" for k in range(3)]
    knn = [r for r in plan.runs if r.entry == "knn"]
    assert len(knn) == 3 * 2 + 1 and all(r.fold is None for r in knn)  # tiny_knn reads a folder: no folds
    run = next(r for r in plan.runs if r.name == "linear__pathology__all__fold2__seed1")
    assert plan.runs[run.needs[0]].name == "pretrain/pathology__seed1"
    loaded = run.load(check_inputs=False)
    assert (loaded.data.folds, loaded.data.fold, loaded.run.seeds) == (3, 2, [1])
    assert loaded.model.weights == tmp_path / "out" / "pretrain" / "pathology__seed1" / "backbone.safetensors"
    pretrain = plan.runs[run.needs[0]].load(check_inputs=False)
    assert (pretrain.run.seed, pretrain.run.resume, pretrain.augment.preset) == (1, True, "pathology")
    code, output = study(str(path), "--dry-run", "--stage", "pretrain")
    assert code == 0 and "# stage pretrain: runs 0-3 (--stage pretrain)" in output and "4 runs: 4 pending" in output
    assert "pathssl pretrain " in output and "linear__" not in output


def test_bad_pretrain_entries_are_reported_naming_each_field(data: tuple[Path, Path], tmp_path: Path) -> None:
    path = write_study(tmp_path, data, more=f"""[[pretrains]]
name = "lonely"
spec = "{SPECS}/pretrain/tiny_mocov2.toml"
[[backbones]]
name = "both"
pretrain = "original"
weights = "random"
""")
    text = path.read_text().replace('reference = "original"', 'reference = "nobody"')
    path.write_text(text)
    code, output = study(str(path), "--dry-run")
    assert code == 2, output
    assert "sets both weights" in output
    path.write_text(text.replace('pretrain = "original"\nweights = "random"', 'pretrain = "originl"'))
    code, output = study(str(path), "--dry-run")
    assert code == 2 and "'originl' names no [[pretrains]] entry" in output
    assert "pretrains[2] ('lonely') is used by no [[backbones]] entry" in output
    assert "tables.reference = 'nobody' is not a backbone name" in output and "Traceback" not in output

    # Checks that need the files: a spec of another kind, another backbone, folds and fractions, preset folds.
    path = write_study(tmp_path, data, more=f"""[[pretrains]]
name = "knn"
spec = "{SPECS}/evaluate/tiny_knn.toml"
[[backbones]]
name = "wrong"
pretrain = "knn"
[[evaluations]]
spec = "linear.toml"
name = "preset"
set = ["data.folds=3", "data.fold=0"]
[[evaluations]]
spec = "linear.toml"
name = "half"
fractions = [0.5]
""")
    path.write_text(path.read_text().replace('name = "original"\npretrain = "original"',
                                             'name = "original"\npretrain = "original"\nbackbone = "vit_tiny"'))
    code, output = study(str(path), "--dry-run")
    assert code == 2, output
    assert "pretrains[2].spec" in output and "kind 'knn'" in output and "go under [[evaluations]]" in output
    assert "backbones[1].backbone: 'vit_tiny', but pretrains 'original' pre-trains 'resnet_tiny'" in output
    assert "evaluations[1].spec: sets data.folds = 3, but the study loops over folds itself" in output
    assert "evaluations[2].fractions: label fractions [0.5] with study.folds" in output


def test_emit_slurm_writes_the_pretraining_array_and_the_rest(data: tuple[Path, Path], tmp_path: Path) -> None:
    path = write_study(tmp_path, data)
    path.write_text(path.read_text().replace("gpus = 0", 'gpus = 0\npretrain_time = "48:00:00"'))
    script = tmp_path / "study.sbatch"
    code, output = study(str(path), "--emit-slurm", str(script))
    assert code == 0, output
    first = (tmp_path / "study.pretrain.sbatch").read_text()
    rest = script.read_text()
    assert "#SBATCH --array=0-3" in first and "#SBATCH --time=48:00:00" in first
    assert '--stage pretrain --index "$SLURM_ARRAY_TASK_ID"' in first
    assert "#SBATCH --array=4-21" in rest and "#SBATCH --time=24:00:00" in rest
    assert '--stage evaluate --index "$SLURM_ARRAY_TASK_ID"' in rest and "--report-only" in rest
    submit = f"jid=$(sbatch --parsable {tmp_path / 'study.pretrain.sbatch'}) && sbatch --dependency=afterany:$jid"
    assert submit in first and submit in output
    # The evaluate stage never pre-trains: a run whose backbone is not made yet fails at once, saying why.
    code, output = study(str(path), "--stage", "evaluate", "--index", "10")
    assert code == 1 and "needs pretrain/original__seed0, which is pending; run the pretrain stage first" in output
    assert not (tmp_path / "out" / "pretrain").exists()
    code, output = study(str(path), "--stage", "pretrain", "--index", "10")
    assert code == 2 and "a run of the evaluate stage, not of --stage pretrain (its runs: 0-3)" in output


@pytest.mark.slow  # 4 two-step pre-trainings and 18 probe fits: ~40 s on a loaded 2-core machine
def test_a_tiny_pretraining_study_runs_resumes_and_reports_paired_differences(data: tuple[Path, Path],
                                                                               tmp_path: Path) -> None:
    path = write_study(tmp_path, data)
    code, output = study(str(path))
    assert code == 0, output
    out = tmp_path / "out"
    assert set(statuses(path).values()) == {"done"}

    # The tables from the runs' own metrics.json, worked out here: a replicate is the mean of its 3 folds.
    def replicate(row: str, seed: int) -> float:
        values = [json.loads((out / "runs" / f"linear__{row}__all__fold{k}__seed{seed}" / "metrics.json")
                             .read_text())["metrics"]["balanced_acc"]["values"][0] for k in range(3)]
        return sum(values) / 3

    rows = {r["backbone"]: r for r in csv.DictReader((out / "report.csv").open())
            if r["metric"] == "balanced_acc"}
    for row in ("random", "original", "pathology"):
        values = [replicate(row, s) for s in (0, 1)]
        assert float(rows[row]["mean"]) == pytest.approx(100 * statistics.fmean(values), abs=1e-3)
        assert float(rows[row]["std"]) == pytest.approx(100 * statistics.stdev(values), abs=1e-3)
        assert rows[row]["n"] == "2" and rows[row]["folds"] == "3"
    differences = [replicate("pathology", s) - replicate("original", s) for s in (0, 1)]
    mean = statistics.fmean(differences)
    half = 12.706 * statistics.stdev(differences) / math.sqrt(2)  # t_{0.975, 1} from a printed table
    pathology = rows["pathology"]
    assert pathology["reference"] == "original" and pathology["difference_n"] == "2"
    assert float(pathology["difference"]) == pytest.approx(100 * mean, abs=1e-3)
    assert float(pathology["difference_high"]) == pytest.approx(100 * (mean + half), abs=2e-2)
    report = (out / "report.md").read_text()
    assert "| pathology − original |" in report and "paired t-interval over seeds" in report
    assert "pretrain/tiny_mocov2.toml" in report and "augment.preset='pathology'" in report

    # Rerunning skips everything; a pre-training killed mid-way is resumed, and its backbone's runs wait for it.
    victim = out / "pretrain" / "original__seed1"
    record = json.loads((victim / "run.json").read_text())
    (victim / "run.json").write_text(json.dumps({**record, "status": "running"}))
    found = statuses(path)
    assert found["pretrain/original__seed1"] == "interrupted" and found["linear__original__all__fold0__seed1"] == "done"
    code, output = study(str(path))
    assert code == 0, output
    assert "pretrain/original__seed1: resuming" in output and output.count("done, skipped") == 21

    # Another length is another backbone: refused until forced; the new backbone makes its evaluations stale.
    path.write_text(path.read_text().replace('"run.steps=2"', '"run.steps=3"'))
    found = statuses(path)
    assert found["pretrain/original__seed0"] == "changed"
    code, output = study(str(path), "--index", "0")
    assert code == 2 and "run.steps: 2 → 3" in output and "--force" in output
    code, output = study(str(path), "--index", "0", "--force", "--stage", "pretrain")
    assert code == 0, output
    found = statuses(path)
    assert found["pretrain/original__seed0"] == "done" and found["linear__original__all__fold1__seed0"] == "stale"
    assert found["linear__original__all__fold1__seed1"] == "done"  # seed 1's backbone is another pre-training
