"""The shared loop against a bare PyTorch loop, and its evaluation against a direct computation."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from finetune.data import build_loader
from finetune.distributed import ShuffleShardSampler
from finetune.errors import TrainingDiverged
from finetune.loop import FitOptions, evaluate, fit, train_one_epoch
from finetune.progress import EpochProgress
from finetune.run_folder import RunFolder
from finetune.runtime import Runtime
from finetune.schedule import build_scheduler


def _data(n: int = 32, classes: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return TensorDataset(images, torch.randint(0, classes, (n,), generator=generator))


def _bare_loop(model, dataset, *, lr, batch_size, accum, seed, epochs, clip=None):
    """The textbook loop: what ours must be equivalent to."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    images_all, labels_all = dataset.tensors
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        batches = order[: len(order) - len(order) % batch_size].split(batch_size)
        model.train()
        for index, batch in enumerate(batches):
            images, labels = images_all[batch], labels_all[batch]
            loss = F.cross_entropy(model(images), labels) / accum
            loss.backward()
            if (index + 1) % accum == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()
    return model


def _our_loop(model, dataset, *, lr, batch_size, accum, seed, epochs, clip=None, run=None):
    runtime = Runtime.create(device="cpu", precision="fp32", channels_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sampler = ShuffleShardSampler(len(dataset), seed=seed, batch_size=batch_size)
    loader = build_loader(
        dataset, batch_size=batch_size, train=True, num_workers=0, pin_memory=False, sampler=sampler
    )
    scheduler = build_scheduler(
        optimizer, name="none", epochs=epochs, steps_per_epoch=-(-len(loader) // accum)
    )
    fit(
        model,
        loader,
        build_loader(dataset, batch_size=64, train=False, num_workers=0, pin_memory=False),
        optimizer,
        scheduler,
        runtime,
        FitOptions(epochs=epochs, num_classes=3, grad_accum_steps=accum, clip_grad_norm=clip),
        run=run,
    )
    return model


@pytest.mark.parametrize("accum, clip", [(1, None), (2, None), (1, 0.5)])
def test_loop_matches_a_bare_pytorch_loop(accum, clip):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    bare = _bare_loop(
        copy.deepcopy(model),
        _data(),
        lr=0.05,
        batch_size=8,
        accum=accum,
        seed=3,
        epochs=2,
        clip=clip,
    )
    ours = _our_loop(
        copy.deepcopy(model),
        _data(),
        lr=0.05,
        batch_size=8,
        accum=accum,
        seed=3,
        epochs=2,
        clip=clip,
    )
    for (name, expected), actual in zip(
        bare.state_dict().items(), ours.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, msg=name)


@pytest.mark.parametrize("n", [32, 40])  # 40: the last window holds one batch, not two
def test_accumulation_equals_a_larger_batch(n):
    """Without BatchNorm, our loop with batches of 8 accumulated 2 by 2 equals batches of 16;
    a last window of one batch steps on that batch's mean loss, not on half of it."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3, img_size=32)
    data = _data(n=n)
    ours = _our_loop(copy.deepcopy(model), data, lr=0.01, batch_size=8, accum=2, seed=1, epochs=1)
    big = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(big.parameters(), lr=0.01, momentum=0.9)
    images_all, labels_all = data.tensors
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))  # seed 1 + epoch 1
    for batch in order.split(16):
        F.cross_entropy(big(images_all[batch]), labels_all[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
    for expected, actual in zip(big.state_dict().values(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=6).eval()
    data = _data(n=20, classes=6)
    runtime = Runtime.create(device="cpu", precision="fp32", channels_last=False)
    loader = build_loader(data, batch_size=7, train=False, num_workers=0, pin_memory=False)
    metrics = evaluate(model, loader, runtime, num_classes=6, per_class=True)
    with torch.no_grad():
        logits = model(data.tensors[0])
    labels = data.tensors[1]
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["val/top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert metrics["val/top5"] == pytest.approx(top5)
    assert sum(metrics["per_class_images"]) == 20


def test_no_top5_below_five_classes():
    model = timm.create_model("test_resnet", num_classes=3).eval()
    runtime = Runtime.create(device="cpu", precision="fp32", channels_last=False)
    loader = build_loader(_data(n=8), batch_size=8, train=False, num_workers=0, pin_memory=False)
    assert "val/top5" not in evaluate(model, loader, runtime, num_classes=3)


class _Poisoned(TensorDataset):
    """Images that turn to NaN once ``poisoned`` is set: divergence on demand."""

    poisoned = False

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return (image * float("nan") if self.poisoned else image), label


def test_divergence_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """Epoch 1 trains and commits; in epoch 2 the loss turns NaN at the first step: the run
    stops there, names the epoch and step, and last/ still holds epoch 1, bit for bit."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    data = _Poisoned(*_data().tensors)
    run = RunFolder(tmp_path / "run")
    run.create()
    _our_loop(model, data, lr=0.01, batch_size=8, accum=1, seed=0, epochs=1, run=run)
    committed = (run.path / "last").resolve()
    weights = (committed / "model.safetensors").read_bytes()
    data.poisoned = True
    with pytest.raises(TrainingDiverged) as caught:
        _our_loop(model, data, lr=0.01, batch_size=8, accum=1, seed=0, epochs=2, run=run)
    assert (caught.value.epoch, caught.value.step) == (1, 1)  # a fresh state: epoch 1 again
    assert "Lower optimizer.lr" in str(caught.value)
    assert (run.path / "last").resolve() == committed
    assert (committed / "model.safetensors").read_bytes() == weights
    assert [row["epoch"] for row in run.read_metrics()] == [1]


class _NoSchedule:
    """A schedule that keeps the LR fixed: the test is about the gradients."""

    def step_update(self) -> None:
        pass

    def step_epoch(self, metrics=None) -> None:
        pass


def test_a_short_last_accumulation_window_is_not_scaled_down():
    """Three batches accumulated two by two: the first step takes the mean gradient of batches
    1 and 2; the last window holds batch 3 alone, and its step must be a plain single-batch step
    (loss / 1), not half of one (loss / 2). SGD with lr 1 and no momentum makes each update
    exactly minus the gradient, so a wrong scale shows in the weights."""
    from torch import nn
    from torch.utils.data import DataLoader

    from finetune.loop import FitOptions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # 3 batches, in order
    assert len(loader) == 3

    def gradient(net: nn.Module, batch: slice) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images[batch]), labels[batch]).backward()
        return [p.grad.clone() for p in net.parameters()]

    by_hand = copy.deepcopy(model)
    first = [
        (a + b) / 2
        for a, b in zip(gradient(by_hand, slice(0, 4)), gradient(by_hand, slice(4, 8)), strict=True)
    ]
    for parameter, grad in zip(by_hand.parameters(), first, strict=True):
        parameter.data -= grad
    halved = copy.deepcopy(by_hand)  # what a loop that divided the last window by 2 would give
    last = gradient(by_hand, slice(8, 12))
    for parameter, twin, grad in zip(by_hand.parameters(), halved.parameters(), last, strict=True):
        parameter.data -= grad
        twin.data -= grad / 2

    ours = copy.deepcopy(model)
    optimizer = torch.optim.SGD(ours.parameters(), lr=1.0, momentum=0.0)
    runtime = Runtime.create(device="cpu", precision="fp32", channels_last=False)
    metrics = train_one_epoch(
        ours,
        loader,
        optimizer,
        _NoSchedule(),
        runtime,
        EpochProgress(enabled=False),
        FitOptions(epochs=1, num_classes=3, grad_accum_steps=2),
    )
    assert metrics["train/loss"] > 0
    for name, actual in ours.state_dict().items():
        torch.testing.assert_close(actual, by_hand.state_dict()[name], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours[1].weight, halved[1].weight, atol=1e-4)  # the check can fail
