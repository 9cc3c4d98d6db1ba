"""One split rule for `pathssl tile` and `pathssl segment predict`: arguments, SLURM arrays, RANK/WORLD_SIZE."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.errors import SpecError
from pathssl_cli.sharding import resolve_shard

ITEMS = [f"slide{i:02d}" for i in range(11)]


def _parts(envs: list[dict[str, str]]) -> list[list[str]]:
    return [resolve_shard(env=env).take(ITEMS) for env in envs]


def test_precedence_arguments_then_slurm_then_rank() -> None:
    both = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "0", "WORLD_SIZE": "2"}
    assert resolve_shard(4, 2, env=both) == resolve_shard(4, 2, env={})
    assert resolve_shard(4, 2, env=both).source == "arguments"
    assert (resolve_shard(env=both).index, resolve_shard(env=both).count) == (1, 3)
    rank = resolve_shard(env={"RANK": "1", "WORLD_SIZE": "2"})
    assert (rank.index, rank.count, rank.source) == (1, 2, "RANK/WORLD_SIZE")
    assert resolve_shard(env={"RANK": "0", "WORLD_SIZE": "1"}).count == 1
    assert resolve_shard(env={}).take(ITEMS) == ITEMS


@pytest.mark.parametrize(("first", "step"), [(0, 1), (1, 1), (5, 3)])
def test_slurm_arrays_that_do_not_start_at_zero_cover_everything_once(first: int, step: int) -> None:
    count = 4
    envs = [{"SLURM_ARRAY_TASK_ID": str(first + k * step), "SLURM_ARRAY_TASK_COUNT": str(count),
             "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_STEP": str(step)} for k in range(count)]
    parts = _parts(envs)
    flat = [item for part in parts for item in part]
    assert sorted(flat) == ITEMS and len(flat) == len(set(flat))
    assert [len(p) for p in parts] == [3, 3, 3, 2]


@pytest.mark.parametrize(("args", "env", "message"), [
    ((2, None), {}, "go together"),
    ((2, 2), {}, "0..1"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4"}, "does not map"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                    "SLURM_ARRAY_TASK_STEP": "2"}, "does not map"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "not an integer"),
    ((None, None), {"WORLD_SIZE": "4", "RANK": "4"}, "RANK in 0..3"),
])
def test_invalid_splits_are_spec_errors(args: tuple, env: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        resolve_shard(*args, env=env)


def test_cli_rejects_bad_slurm_environment_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    for command in (["tile"], ["segment", "predict"]):
        result = CliRunner().invoke(cli, [*command, str(tmp_path / "spec.toml")])
        assert result.exit_code == 2 and "does not map" in result.output and "Traceback" not in result.output


def test_segment_predict_takes_its_slurm_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each array task predicts only its inputs, into its own run record; together they cover all once."""
    import pathssl_cli.segment.predict as predict
    import pathssl_cli.segment.train as train
    from pathssl_cli.specs import load_spec

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"img{i}.png").write_bytes(b"")
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    seen: list[str] = []

    def fake_segment(model_, reader, out_dir, name, **kwargs):  # the split, not the network, is under test
        seen.append(name)
        return predict.PredictOutputs(inst_map=out_dir / name, instances=out_dir / name, geojson=out_dir / name,
                                      overlay=None, count=1)

    monkeypatch.setattr(train, "default_model_path", lambda spec: model)
    monkeypatch.setattr(train, "load_model", lambda path, device, **_: SimpleNamespace(
        config=SimpleNamespace(num_types=0), input_size=64, output_size=64))
    monkeypatch.setattr(predict, "open_reader", lambda path, *args, **kwargs: None)
    monkeypatch.setattr(predict, "segment_image", fake_segment)
    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "segment" / "tiny.toml",
                     [f"predict.inputs=['{images}/*.png']", f"run.output_dir='{tmp_path / 'run'}'"],
                     check_inputs=False)
    per_task = []
    for task in (1, 2):  # --array=1-2: ids start at 1
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        seen.clear()
        predict.run_segment_predict(spec)
        per_task.append(list(seen))
        record = tmp_path / "run" / f"predict_run-{task - 1}-of-2" / "predict_summary.json"
        assert len(json.loads(record.read_text())["outputs"]) == len(seen)
    assert per_task == [["img0", "img2", "img4"], ["img1", "img3"]]
