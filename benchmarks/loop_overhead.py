"""Is the shared loop as fast as a bare PyTorch loop? Both train the same model in one process.

Alternates rounds of finetune's ``train_one_epoch`` (runtime, autocast, accumulation, progress
bookkeeping) and a textbook loop over the same in-memory batches, and prints images/s per round
and the median ratio. On a GPU it uses the GPU; the textbook loop gets the same autocast and
memory format as finetune's (``--precision``, ``--channels-last``).

    python benchmarks/loop_overhead.py                      # resnet18 @ 128 px, batch 16, fp32
    python benchmarks/loop_overhead.py --model resnet50 --size 224 --batches 4
    python benchmarks/loop_overhead.py --model resnet50 --size 224 --batch 64 --precision auto \
        --channels-last auto                                # what finetune run picks on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from finetune.loop import FitOptions, train_one_epoch
from finetune.progress import EpochProgress
from finetune.runtime import PRECISION_DTYPES, Runtime
from finetune.schedule import build_scheduler


def bare_epoch(model, batches, optimizer, device, dtype=None, channels_last=False) -> float:
    """The textbook loop (with ``dtype`` autocast, fp16's loss scaling and channels_last inputs
    when asked)."""
    model.train()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    start = time.perf_counter()
    for images, labels in batches:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(labels) for _, labels in batches) / (time.perf_counter() - start)


def our_epoch(model, batches, optimizer, runtime, scheduler) -> float:
    metrics = train_one_epoch(
        model,
        batches,
        optimizer,
        scheduler,
        runtime,
        EpochProgress(enabled=False),
        FitOptions(epochs=1, num_classes=10),
    )
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return metrics["img_per_s"]


def compare(
    model: str, size: int, batch: int, batches: int, rounds: int, runtime: Runtime
) -> list[tuple[float, float]]:
    """(bare img/s, finetune img/s) per round, after a warm-up step of each; the two models are
    built alike, the batches are the same tensors (on the host, as a loader gives them)."""
    torch.manual_seed(0)
    data = [
        (torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))) for _ in range(batches)
    ]
    if runtime.device.type == "cuda":
        data = [(images.pin_memory(), labels.pin_memory()) for images, labels in data]
    ours_model = runtime.prepare(timm.create_model(model, num_classes=10))
    bare_model = runtime.prepare(timm.create_model(model, num_classes=10))
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.01, momentum=0.9)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=0.9)
    scheduler = build_scheduler(ours_opt, name="none", epochs=1, steps_per_epoch=len(data))
    dtype = PRECISION_DTYPES[runtime.precision]

    def bare() -> float:
        return bare_epoch(bare_model, data, bare_opt, runtime.device, dtype, runtime.channels_last)

    our_epoch(ours_model, data[:1], ours_opt, runtime, scheduler)  # warm-up
    bare_epoch(bare_model, data[:1], bare_opt, runtime.device, dtype, runtime.channels_last)
    return [
        (bare(), our_epoch(ours_model, data, ours_opt, runtime, scheduler)) for _ in range(rounds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="fp32", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--channels-last", default="false", help="auto, true or false")
    args = parser.parse_args()
    channels_last = {"true": True, "false": False}.get(args.channels_last, args.channels_last)
    runtime = Runtime.create(precision=args.precision, channels_last=channels_last)
    print(
        f"{args.model} @ {args.size}px, batch {args.batch}, device {runtime.device}, "
        f"{runtime.precision}, channels_last {runtime.channels_last}, "
        f"{torch.get_num_threads()} threads"
    )
    rounds = compare(args.model, args.size, args.batch, args.batches, args.rounds, runtime)
    for index, (bare, ours) in enumerate(rounds, 1):
        print(
            f"round {index}: bare {bare:7.1f} img/s   finetune {ours:7.1f} img/s   "
            f"ratio {ours / bare:.3f}"
        )
    ratio = statistics.median(ours / bare for bare, ours in rounds)
    print(f"median ratio finetune/bare: {ratio:.3f}")


if __name__ == "__main__":
    main()
