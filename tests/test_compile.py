"""``train.compile``: the model trains compiled, and every file still holds the plain module.

Inductor's C++ build of even ``test_resnet`` takes minutes on this CPU, so the training test
compiles through TorchDynamo with a recording backend that runs the captured graphs as they are:
the wiring (what is compiled, when, what is saved and resumed) is real, the code generation is
not. ``benchmarks/vs_peers.py --compile`` runs the real inductor path.
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import finetune
from finetune.build import build
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.runtime import Runtime, resolve_compile
from tests.conftest import tiny_recipe


def _recipe(compile: bool | str, epochs: int = 1) -> Recipe:
    """A constant LR: one epoch and a resume to two train as two epochs in one go."""
    train = {"epochs": epochs, "device": "cpu", "compile": compile}
    return Recipe.from_dict(tiny_recipe(train=train, scheduler={"name": "none"}))


@pytest.fixture
def graphs(monkeypatch) -> list[bool]:
    """For every graph TorchDynamo captures from now on, whether it was captured with autograd
    on (training) or off (evaluation); each runs as captured (no inductor)."""
    captured: list[bool] = []

    def record(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        captured.append(torch.is_grad_enabled())
        return graph.forward

    torch._dynamo.reset()  # nothing cached from another test's model
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=record))
    yield captured
    torch._dynamo.reset()


def test_auto_is_off_on_the_cpu_and_on_for_cuda(graphs, monkeypatch):
    built = build(_recipe("auto"))
    built.model(torch.zeros(2, 3, 32, 32))
    assert graphs == []  # nothing was compiled
    monkeypatch.setattr("finetune.runtime.compile_unavailable", lambda device: None)
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True  # where inductor can work


def test_compiled_training_saves_plain_keys_resumes_and_trains_as_eager(tmp_path, graphs):
    """One compiled epoch, then a resume to two: TorchDynamo captured the training and the
    evaluation passes, the checkpoints hold the model's own keys (no ``_orig_mod.``), and the
    weights are those of the same two epochs trained without compiling."""
    run_dir = tmp_path / "compiled"
    finetune.run(_recipe(True, epochs=1), run_dir=run_dir)
    assert set(graphs) == {True, False}  # the training and the evaluation passes
    first = load_file(run_dir / "last" / "model.safetensors")
    model_keys = set(build(_recipe(False), data=False).model.state_dict())
    assert set(first) == model_keys

    finetune.run(_recipe(True, epochs=2), resume=run_dir)
    eager_dir = tmp_path / "eager"
    finetune.run(_recipe(False, epochs=2), run_dir=eager_dir)
    resumed = load_file(run_dir / "last" / "model.safetensors")
    eager = load_file(eager_dir / "last" / "model.safetensors")
    assert set(resumed) == model_keys
    for key, value in eager.items():
        torch.testing.assert_close(resumed[key], value, msg=key)


def test_true_without_a_compiler_fails_at_build_time(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(UserError, match=r"train\.compile: .*no-such-compiler\+\+ was not found"):
        build(_recipe(True))


def test_unwrap_finds_the_module_inside_torch_compile():
    """A Python API user may hand ``fit`` what ``torch.compile(model)`` returns: checkpoints
    are written from the module inside it."""
    model = nn.Linear(2, 2)
    assert Runtime.unwrap(torch.compile(model)) is model
