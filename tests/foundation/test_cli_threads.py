"""`pathssl --threads N` (or PATHSSL_THREADS) caps the process's CPU threads before the command runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import torch
from click.testing import CliRunner

from pathssl_cli.cli import cli

SPEC = Path(__file__).resolve().parents[2] / "specs" / "pretrain" / "tiny_mocov2.toml"


@pytest.fixture
def restore_threads() -> Iterator[None]:
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv_threads)


def test_threads_option_sets_torch_and_opencv(restore_threads: None) -> None:
    result = CliRunner().invoke(cli, ["--threads", "1", "spec", "validate", "--no-input-check", str(SPEC)])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert cv2.getNumThreads() == 1


def test_threads_from_environment(restore_threads: None) -> None:
    result = CliRunner().invoke(cli, ["spec", "validate", "--no-input-check", str(SPEC)], env={"PATHSSL_THREADS": "2"})
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2


def test_without_threads_the_setting_is_left_alone(restore_threads: None) -> None:
    result = CliRunner().invoke(cli, ["spec", "validate", "--no-input-check", str(SPEC)])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_thread_count_is_an_argument_error(value: str, restore_threads: None) -> None:
    result = CliRunner().invoke(cli, ["--threads", value, "spec", "validate", str(SPEC)])
    assert result.exit_code == 2
    assert "--threads" in result.output
    assert torch.get_num_threads() == 3
