"""One split rule for `pathssl tile` and `pathssl segment predict`: arguments or a SLURM array (only when asked)
as the outer part, torchrun's RANK/WORLD_SIZE inside it; and every command's device is its rank's own GPU."""

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


def _parts(envs: list[dict[str, str]], array: bool = False) -> list[list[str]]:
    return [resolve_shard(array=array, env=env).take(ITEMS) for env in envs]


def test_precedence_arguments_then_slurm_then_rank() -> None:
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_shard(4, 2, env=slurm) == resolve_shard(4, 2, env={})
    assert resolve_shard(4, 2, env=slurm).source == "arguments"
    assert (resolve_shard(array=True, env=slurm).index, resolve_shard(array=True, env=slurm).count) == (1, 3)
    rank = resolve_shard(env={"RANK": "1", "WORLD_SIZE": "2"})
    assert (rank.index, rank.count, rank.source) == (1, 2, "RANK/WORLD_SIZE")
    assert resolve_shard(env={"RANK": "0", "WORLD_SIZE": "1"}).count == 1
    assert resolve_shard(env={}).take(ITEMS) == ITEMS


def test_an_array_splits_the_list_only_when_asked() -> None:
    """Issue 20 §3: `sbatch --array=0-9` used as a sweep (one spec per task) silently gave each spec 1/10 of its
    slides. Without --split-array an array task does the whole list, and says so in run.json."""
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "10"}
    sweep = resolve_shard(env=env)
    assert sweep.take(ITEMS) == ITEMS and sweep.count == 1
    assert "SLURM array task 3" in sweep.record()["array_ignored"]
    split = resolve_shard(array=True, env=env)
    assert (split.index, split.count, split.source) == (3, 10, "SLURM array")
    assert split.record()["array_task"] == {"id": 3, "part": 3, "parts": 10}
    with pytest.raises(SpecError, match="SLURM_ARRAY_TASK_ID is not set"):
        resolve_shard(array=True, env={})
    with pytest.raises(SpecError, match="give one of them"):
        resolve_shard(2, 0, array=True, env=env)


@pytest.mark.parametrize("outer", ["array", "arguments"])
def test_array_or_arguments_times_torchrun_cover_everything_once(outer: str) -> None:
    """Issue 20 §3: inside an array task that runs torchrun, rank 0 and rank 1 got the same part (both predicted
    slide0 and slide4). Now part p of P and rank r of W take index p*W + r of P*W."""
    parts, world = 3, 2
    taken: dict[tuple[int, int], list[str]] = {}
    for p in range(parts):
        for r in range(world):
            env = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)}
            if outer == "array":
                env.update(SLURM_ARRAY_TASK_ID=str(p), SLURM_ARRAY_TASK_COUNT=str(parts))
                shard = resolve_shard(array=True, env=env)
            else:
                shard = resolve_shard(parts, p, env=env)
            assert (shard.index, shard.count) == (p * world + r, parts * world)
            assert shard.record()["rank"] == r and shard.record()["world_size"] == world
            assert shard.source.endswith(" x RANK/WORLD_SIZE")
            taken[(p, r)] = shard.take(ITEMS)
    assert taken[(0, 0)] != taken[(0, 1)]
    flat = [item for part in taken.values() for item in part]
    assert sorted(flat) == ITEMS and len(flat) == len(set(flat))


@pytest.mark.parametrize(("first", "step"), [(0, 1), (1, 1), (5, 3)])
def test_slurm_arrays_that_do_not_start_at_zero_cover_everything_once(first: int, step: int) -> None:
    count = 4
    envs = [{"SLURM_ARRAY_TASK_ID": str(first + k * step), "SLURM_ARRAY_TASK_COUNT": str(count),
             "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_STEP": str(step)} for k in range(count)]
    parts = _parts(envs, array=True)
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
        resolve_shard(*args, array=args == (None, None) and "SLURM_ARRAY_TASK_ID" in env, env=env)


def test_cli_rejects_bad_slurm_environment_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    for command in (["tile"], ["segment", "predict"]):
        result = CliRunner().invoke(cli, [*command, str(tmp_path / "spec.toml"), "--split-array"])
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
        predict.run_segment_predict(spec, split_array=True)
        per_task.append(list(seen))
        record = tmp_path / "run" / f"predict_run-{task - 1}-of-2" / "predict_summary.json"
        assert len(json.loads(record.read_text())["outputs"]) == len(seen)
        run = json.loads((record.parent / "run.json").read_text())
        assert run["shard"] == {"index": task - 1, "count": 2, "source": "SLURM array",
                                "array_task": {"id": task, "part": task - 1, "parts": 2}}
    assert per_task == [["img0", "img2", "img4"], ["img1", "img3"]]
    seen.clear()  # the same array task without --split-array (an array over specs): every input
    predict.run_segment_predict(spec)
    assert seen == [f"img{i}" for i in range(5)]
    run = json.loads((tmp_path / "run" / "predict_run" / "run.json").read_text())
    assert run["shard"]["count"] == 1 and "array_ignored" in run["shard"]


def test_every_rank_gets_its_own_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20 §3: `segment predict` under torchrun put every rank on cuda:0. The one device rule
    (`distributed.resolve_device`) takes torchrun's LOCAL_RANK, for predict as for every command."""
    import torch

    import pathssl_cli.segment.predict as predict
    import pathssl_cli.segment.train as train
    from pathssl_cli.distributed import resolve_device
    from pathssl_cli.specs import load_spec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("auto", local_rank=3) == torch.device("cuda:3")

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    devices: list[torch.device] = []

    def fake_load(path: Path, device: torch.device, **_: object) -> SimpleNamespace:
        devices.append(device)
        return SimpleNamespace(config=SimpleNamespace(num_types=0), input_size=64, output_size=64)

    monkeypatch.setattr(train, "default_model_path", lambda spec: tmp_path / "model.pt")
    monkeypatch.setattr(train, "load_model", fake_load)
    monkeypatch.setattr(predict, "open_reader", lambda path, *args, **kwargs: None)
    monkeypatch.setattr(predict, "segment_image", lambda model, reader, out_dir, name, **kwargs: (
        predict.PredictOutputs(out_dir / name, out_dir / name, out_dir / name, None, 0)))
    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "segment" / "tiny.toml",
                     [f"predict.inputs=['{tmp_path}/a.png']", f"run.output_dir='{tmp_path / 'run'}'",
                      "run.device='auto'"], check_inputs=False)
    predict.run_segment_predict(spec)
    assert devices == [torch.device("cuda:1")]


def test_tile_splits_by_the_array_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rule for `pathssl tile`: an array task tiles every slide unless --split-array, and run.json and
    the part's summary say which part it took and why."""
    import pathssl_cli.tiling.tiler as tiler
    from pathssl_cli.specs import load_spec

    slides = []
    for i in range(3):
        slides.append(tmp_path / f"s{i}.tif")
        slides[-1].write_bytes(b"")
    jobs: list[list] = []
    monkeypatch.setattr(tiler, "_run_jobs", lambda todo, settings, workers: (jobs.append(todo), [])[1])
    spec = tmp_path / "tile.toml"
    spec.write_text(f'kind = "tile"\n[input]\nslides = {[str(s) for s in slides]}\n'
                    f'[output]\ndir = "{tmp_path / "store"}"\n')
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    result = CliRunner().invoke(cli, ["tile", str(spec)])
    assert result.exit_code == 0, result.output
    assert len(jobs[-1]) == 3 and "--split-array not given" in result.output
    run = json.loads((tmp_path / "store" / "run.json").read_text())
    assert run["shard"]["count"] == 1 and "array_ignored" in run["shard"]
    tiler.run_tile(load_spec(spec, (), kind="tile"), split_array=True)
    assert [Path(p).name for p, _mpp in jobs[-1]] == ["s1.tif"]
    part = json.loads((tmp_path / "store" / "summary-1-of-3.json").read_text())["part"]
    assert part == {"index": 1, "count": 3, "source": "SLURM array", "array_task": {"id": 1, "part": 1, "parts": 3}}
