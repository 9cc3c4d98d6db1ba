"""`segment train` with data.num_types below the labels' largest type id: a named input error before training."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.synthetic_sets import write_consep_like

TINY_SPEC = Path(__file__).resolve().parents[2] / "specs" / "segment" / "tiny.toml"


def test_num_types_below_the_largest_label_type_is_a_spec_error(tmp_path: Path) -> None:
    # The four synthetic textures in CoNSeP layout carry type ids up to 4; with num_types = 2 the type branch
    # has 3 outputs, and training used to fail with an unnamed error from the loss.
    data = write_consep_like(tmp_path / "consep", n_images=4, size=64, seed=0)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "segment", "train", str(TINY_SPEC), "--set", f"data.train=['{data}']", "--set", f"data.test=['{data}']",
        "--set", "data.num_types=2", "--set", f"run.output_dir='{run_dir}'", "--set", "train.steps_per_epoch=1"])
    assert result.exit_code == 2, result.output
    assert "data.train" in result.output and "data.num_types = 2" in result.output
    assert "type ids up to 4" in result.output and "Traceback" not in result.output
    assert not (run_dir / "checkpoints").exists()  # nothing was trained
