"""What does a checkpoint cost? Bytes written and seconds per checkpoint of a head-only model.

Each "epoch" trains the head for one step on random images (BatchNorm statistics move too unless
``--batchnorm frozen``), then saves: once as a run folder's checkpoint (``commit_checkpoint``:
weights, optimizer and loop state, fsynced, committed atomically, ``last``/``best`` links moved)
and once as a bare script would, ``safetensors.torch.save_file(model.state_dict(), path)`` with
no fsync. Bytes are what the process handed to ``write()`` (``wchar`` in ``/proc/self/io``);
"on disk" counts each file once however many checkpoints link to it.

    python benchmarks/checkpoint_writes.py                        # resnet18, 5 epochs
    python benchmarks/checkpoint_writes.py --model resnet50 --batchnorm frozen
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from finetune.freezing import freeze
from finetune.model import build_model
from finetune.run_folder import RunFolder


def bytes_written() -> int:
    """Bytes this process has passed to ``write()`` so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, each inode counted once (hard links share one)."""
    seen: dict[int, int] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            seen[stat.st_ino] = stat.st_size
    return sum(seen.values())


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, size: int) -> None:
    model.train()
    images, labels = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def measure(epochs: int, step: Callable[[], None], save: Callable[[int], None]) -> list[tuple]:
    """(bytes, seconds) of each epoch's save."""
    figures = []
    for epoch in range(1, epochs + 1):
        step()
        written, start = bytes_written(), time.perf_counter()
        save(epoch)
        figures.append((bytes_written() - written, time.perf_counter() - start))
    return figures


def report(name: str, figures: list[tuple], folder: Path) -> None:
    first, rest = figures[0], figures[1:] or figures
    then = statistics.median(b for b, _ in rest), statistics.median(s for _, s in rest)
    print(
        f"{name:<22} first {first[0] / 1e6:8.2f} MB {first[1]:6.3f} s | then per epoch "
        f"{then[0] / 1e6:8.3f} MB {then[1]:6.3f} s | on disk {disk_bytes(folder) / 1e6:7.2f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batchnorm", choices=["train", "frozen"], default="train")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(backbone=args.model, num_classes=10).model
    head = model.get_classifier()
    head_name = next(name for name, module in model.named_modules() if module is head)
    report_ = freeze(model, until=head_name, batchnorm=args.batchnorm, head=head_name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"{args.model}: {len(report_.frozen)} frozen and {len(report_.trainable)} trainable "
        f"tensors ({sum(p.numel() for p in trainable):,} trainable parameters), "
        f"batchnorm {args.batchnorm}, {args.epochs} epochs"
    )
    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        run, bare = RunFolder(Path(tmp) / "run"), Path(tmp) / "bare"
        run.create()
        bare.mkdir()

        def ours(epoch: int) -> None:
            state = {"epoch": epoch, "step": 0, "history": [], "optimizer": optimizer.state_dict()}
            run.commit_checkpoint(model, state, best=True)

        def script(epoch: int) -> None:
            save_file(model.state_dict(), str(bare / "last.safetensors"))

        def step() -> None:
            train_step(model, optimizer, args.size)

        report("finetune checkpoint", measure(args.epochs, step, ours), run.path / "ckpt")
        report("bare save_file", measure(args.epochs, step, script), bare)


if __name__ == "__main__":
    main()
