"""The tile spec's input check: a literal slide path must exist, globs must match something, CSV rows may not."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.errors import SpecError
from pathssl_cli.specs import load_spec


def _spec(folder: Path, slides: list[str]) -> Path:
    listed = ", ".join(f'"{s}"' for s in slides)
    path = folder / "tile.toml"
    path.write_text(f'kind = "tile"\n[input]\nslides = [{listed}]\n[output]\ndir = "store"\n')
    return path


def test_literal_slide_path_that_does_not_exist_is_a_spec_error(tmp_path: Path) -> None:
    # Issue 11 item 12: it used to pass `spec validate` and fail only as a row of errors.csv after the run.
    (tmp_path / "a.svs").write_bytes(b"")
    spec = _spec(tmp_path, ["a.svs", "typo.svs", "gone/*.svs", "missing.csv"])
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    problems = {p.where.rpartition(": ")[2]: p.message for p in info.value.problems}
    assert set(problems) == {"input.slides[1]", "input.slides[3]"}  # the glob is a pattern, not a file
    assert str(tmp_path / "typo.svs") in problems["input.slides[1]"]
    assert all(p.where.startswith(str(spec)) for p in info.value.problems)
    result = CliRunner().invoke(cli, ["spec", "validate", str(spec)])
    assert result.exit_code == 2 and "typo.svs" in result.output
    # Structure-only validation (CI without the slides) does not look at the files.
    assert CliRunner().invoke(cli, ["spec", "validate", "--no-input-check", str(spec)]).exit_code == 0


def test_existing_literal_paths_and_csv_rows_that_are_missing_pass(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "list.csv").write_text("path\nlost.svs\n")  # a lost slide in a list: an errors.csv row
    load_spec(_spec(tmp_path, ["a.svs", "list.csv"]))
    with pytest.raises(SpecError, match="no slide matched"):
        load_spec(_spec(tmp_path, ["gone/*.svs"]))
