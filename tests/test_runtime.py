"""Device and precision choices on this (CPU) machine."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import UserError
from finetune.runtime import Runtime, resolve_precision


def test_auto_on_a_cpu_machine_is_fp32_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    runtime = Runtime.create()
    assert runtime.device.type == "cpu"
    assert runtime.precision == "fp32"
    assert runtime.channels_last is False and runtime.pin_memory is False
    assert not runtime.scaler.is_enabled()


def test_missing_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="train.device"):
        Runtime.create(device="cuda")


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="train.precision"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bf16_autocast_on_cpu_runs_in_bf16():
    runtime = Runtime.create(device="cpu", precision="bf16")
    layer = torch.nn.Linear(4, 4)
    with runtime.autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16


def test_rank_and_world_size_come_from_the_environment(monkeypatch):
    import finetune.distributed

    joined = []
    monkeypatch.setattr(finetune.distributed, "init_process_group", joined.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime = Runtime.create(device="cpu")
    assert (runtime.rank, runtime.world_size, runtime.is_main) == (1, 2, False)
    assert joined == [torch.device("cpu")]  # torchrun's job is joined with the CPU backend


def test_resuming_in_fp16_a_run_saved_without_loss_scaling():
    """A bf16 or fp32 run saves an empty scaler state; resumed in fp16 it starts a fresh scale."""
    saved_without = Runtime.create(device="cpu", precision="fp32").scaler.state_dict()
    assert saved_without == {}
    runtime = Runtime.create(device="cpu", precision="fp32")
    runtime.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)  # fp16 stand-in
    runtime.load_scaler_state(saved_without)
    assert runtime.scaler.get_scale() == 1024.0
    saved_with = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    runtime.load_scaler_state(saved_with)
    assert runtime.scaler.get_scale() == 8.0
