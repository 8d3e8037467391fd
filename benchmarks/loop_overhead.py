"""Is the shared loop as fast as a bare PyTorch loop? Both train the same model in one process.

Alternates rounds of finetune's ``train_one_epoch`` (runtime, autocast, accumulation, progress
bookkeeping) and a textbook loop over the same in-memory batches, and prints images/s per round
and the median ratio. On a GPU it uses the GPU (with the precision ``auto`` picks).

    python benchmarks/loop_overhead.py                      # resnet18 @ 128 px, batch 16
    python benchmarks/loop_overhead.py --model resnet50 --size 224 --batches 4
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
from finetune.runtime import Runtime
from finetune.schedule import build_scheduler


def bare_epoch(model, batches, optimizer, device) -> float:
    model.train()
    start = time.perf_counter()
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runtime = Runtime.create(precision="fp32")  # the same arithmetic for both loops
    torch.manual_seed(0)
    batches = [
        (torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,)))
        for _ in range(args.batches)
    ]
    ours_model = timm.create_model(args.model, num_classes=10).to(runtime.device)
    bare_model = timm.create_model(args.model, num_classes=10).to(runtime.device)
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.01, momentum=0.9)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=0.9)
    scheduler = build_scheduler(ours_opt, name="none", epochs=1, steps_per_epoch=len(batches))
    our_epoch(ours_model, batches[:1], ours_opt, runtime, scheduler)  # warm-up
    bare_epoch(bare_model, batches[:1], bare_opt, runtime.device)
    ratios = []
    print(
        f"{args.model} @ {args.size}px, batch {args.batch}, device {runtime.device}, "
        f"{torch.get_num_threads()} threads"
    )
    for round_index in range(args.rounds):
        bare = bare_epoch(bare_model, batches, bare_opt, runtime.device)
        ours = our_epoch(ours_model, batches, ours_opt, runtime, scheduler)
        ratios.append(ours / bare)
        print(
            f"round {round_index + 1}: bare {bare:7.1f} img/s   finetune {ours:7.1f} img/s   "
            f"ratio {ours / bare:.3f}"
        )
    print(f"median ratio finetune/bare: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
