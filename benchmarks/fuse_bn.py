"""Does folding BatchNorm speed up inference? Eager eval images/s: unfused, ``fuse_bn``, torch.fx.

For each model, alternates rounds of the unfused model, the ``finetune.fusion.fuse_bn`` model and
(where torch.fx can trace it) ``torch.fx.experimental.optimization.fuse``, all in this process on
the same in-memory batch, and prints images/s per round, the medians and the ratios to unfused.

    python benchmarks/fuse_bn.py                           # resnet50 @ 224 px, resnet18 @ 128 px
    python benchmarks/fuse_bn.py --models resnet18:128 --rounds 7 --threads 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from finetune.export import compare_logits
from finetune.fusion import fuse_bn


def images_per_second(model: nn.Module, batch: torch.Tensor, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        model(batch)
    return iterations * len(batch) / (time.perf_counter() - start)


def fx_fused(model: nn.Module) -> nn.Module | None:
    """torch.fx's conv+BN fusion, or None when fx cannot trace the model."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - any tracing failure: no fx variant for this model
        return None


def benchmark(name: str, size: int, batch_size: int, rounds: int, iterations: int) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    variants: dict[str, Callable[..., object]] = {
        "unfused": model,
        "fuse_bn": fuse_bn(model, example_input=batch[:2]),
    }
    traced = fx_fused(model)
    if traced is not None:
        variants["fx fuse"] = traced
    print(
        f"{name} @ {size}px, batch {batch_size}, {torch.get_num_threads()} threads, "
        f"{iterations} batches per measurement"
    )
    speeds: dict[str, list[float]] = {key: [] for key in variants}
    with torch.inference_mode():
        reference = model(batch)
        for key, variant in variants.items():  # warm-up, and the parity of each variant
            parity = compare_logits(reference, variant(batch))["max_rel_diff"]
            print(f"  {key:8s} max relative logit difference {parity:.1e}")
        for round_index in range(rounds):
            for key, variant in variants.items():
                speeds[key].append(images_per_second(variant, batch, iterations))
            print(
                f"  round {round_index + 1}: "
                + "   ".join(f"{key} {values[-1]:6.1f}" for key, values in speeds.items())
                + " img/s"
            )
    base = statistics.median(speeds["unfused"])
    for key, values in speeds.items():
        median = statistics.median(values)
        print(f"  median {key:8s} {median:6.1f} img/s   ratio to unfused {median / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet50:224", "resnet18:128"], help="timm name:image size"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.models:
        name, size = spec.split(":")
        benchmark(name, int(size), args.batch, args.rounds, args.iterations)


if __name__ == "__main__":
    main()
