"""benchmarks/gpu_check.py on the CPU with a tiny model: every path that does not need CUDA runs
through the real code, the others say they were skipped, so the script works when a GPU is lent."""

from __future__ import annotations

import sys

from tests.conftest import load_benchmark


def test_gpu_check_runs_every_path_this_device_has(tmp_path, monkeypatch):
    table = tmp_path / "gpu-check.md"
    arguments = [
        *("--device", "cpu", "--model", "test_resnet", "--size", "32"),
        *("--images", "16", "--batch", "8", "--workers", "0", "--bench-model", "test_resnet"),
        *("--bench-size", "32", "--bench-batch", "4", "--bench-batches", "2"),
        *("--skip", "nproc-1"),  # test_distributed.py runs --nproc 1 (15 s of torchrun here)
        *("--out", str(tmp_path / "runs"), "--markdown", str(table)),
    ]
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *arguments])
    assert load_benchmark("gpu_check").main() == 0
    rows = {
        cells[0]: cells[1:]
        for line in table.read_text().splitlines()[4:]
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    needs_cuda = {"fp16", "pinned-memory", "compile"}
    assert set(rows) == {
        *(needs_cuda | {"nproc-1"}),
        *("bf16", "channels-last", "feature-cache", "export", "throughput"),
    }
    for path, (status, detail, _) in rows.items():
        assert status == ("skipped" if path in needs_cuda | {"nproc-1"} else "ok"), (path, detail)
    assert rows["fp16"][1] == "needs CUDA (device cpu)"
    assert rows["nproc-1"][1] == "not chosen (--only, --skip)"
    assert "logits torch.bfloat16" in rows["bf16"][1]
    assert "15 conv weights channels_last" in rows["channels-last"][1]
    assert "BatchNorms folded" in rows["export"][1]
    assert (tmp_path / "runs" / "checkpoints" / ".feature-cache").is_dir()
