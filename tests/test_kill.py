"""A run folder survives SIGKILL at any instant: the quick version of benchmarks/kill_soak.py."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path):
    """Two trials, each killed at a random instant or during a checkpoint save (with the
    default loader workers and augmentations), resumed to the end: bitwise equal weights."""
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/kill_soak.py",
            "--kills=2",
            "--epochs=1",
            "--backbone=test_resnet",
            "--max-delay=6",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 of 2 runs" in result.stdout, result.stdout
