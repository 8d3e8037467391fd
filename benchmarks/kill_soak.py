"""SIGKILL soak: kill `finetune run` at random instants, and while it saves a checkpoint, resume
it until it finishes, and compare its final weights with an uninterrupted run, bit for bit.

    python benchmarks/kill_soak.py --kills 30        # the issue's soak (about 10 minutes)
    python benchmarks/kill_soak.py --kills 3 --epochs 2   # the quick version the tests run
    python benchmarks/kill_soak.py --kills 10 --epochs 2 --freeze   # shared frozen files too

Each trial starts a fresh run and SIGKILLs its whole process group (loader workers included)
either after a random delay or the moment a checkpoint's staging folder appears (a save in
progress), then runs `finetune run RECIPE --resume DIR` until the run completes; a trial may be
killed more than once. The recipe uses the defaults a user gets (loader workers: auto, hflip and
random crops) and checkpoints every few steps, so most kills land mid-epoch. With ``--freeze``
the stem and layer1 start frozen and layer1 trains from epoch 2: checkpoints hard-link the
shared frozen file, then write a new one when layer1 starts to change.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from finetune.weights import read_state_dict

REPO = Path(__file__).resolve().parent.parent


def recipe(epochs: int, backbone: str, freeze: bool) -> dict:
    frozen = {"until": "layer2", "unfreeze": [{"epoch": 2, "patterns": ["layer1.*"]}]}
    return {
        "name": "kill-soak",
        "seed": 0,
        "model": {"backbone": backbone, "num_classes": 3, "head": {"dropout": 0.2}},
        "data": {
            "train": {"type": "fake", "num_samples": 96, "num_classes": 3},
            "val": {"type": "fake", "num_samples": 24, "num_classes": 3, "seed": 1},
            "image_size": 32,
            "batch_size": 8,
            "augment": ["hflip", {"random_resized_crop": [0.5, 1.0]}],
        },
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"name": "cosine", "warmup_epochs": 1},
        "train": {"epochs": epochs, "device": "cpu", "checkpoint_every": {"steps": 5}},
        **({"freeze": frozen} if freeze else {}),
    }


def start(args: list[str]) -> subprocess.Popen:
    """`python -m finetune ARGS` in a session of its own, so a kill reaches its workers too."""
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_for_save(run_dir: Path, process: subprocess.Popen, timeout: float) -> bool:
    """Poll until a checkpoint is being written (its staging folder exists); False if the
    process ended or the time ran out first."""
    folder, deadline = run_dir / "ckpt", time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if any(name.startswith(".staging-") for name in os.listdir(folder)):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return False


def one_run(path: Path, run_dir: Path) -> subprocess.Popen:
    """Start or continue the run in ``run_dir``: resume once its recipe.yaml exists."""
    if (run_dir / "recipe.yaml").is_file():
        return start(["run", str(path), "--resume", str(run_dir)])
    return start(["run", str(path), "--run-dir", str(run_dir)])


def trial(path: Path, run_dir: Path, rng: random.Random, max_delay: float) -> tuple[int, str]:
    """Kill the run once or twice, then let it finish; (kills, how the first kill was timed)."""
    kills, mode = 0, rng.choice(["random", "during a save"])
    for _ in range(rng.choice([1, 1, 2])):
        process = one_run(path, run_dir)
        if mode == "random":
            time.sleep(rng.uniform(0.2, max_delay))
        elif not wait_for_save(run_dir, process, timeout=max_delay * 3):
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break  # it finished before the kill
        kill_group(process)
        kills += 1
    process = one_run(path, run_dir)
    _, stderr = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"{run_dir}: the final resume exited {process.returncode}: {stderr}")
    return kills, mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="trials (each kills 1-2 times)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=8.0, help="latest random kill (s)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--freeze", action="store_true", help="frozen stem, layer1 unfrozen")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "recipe.yaml"
    soak = recipe(args.epochs, args.backbone, args.freeze)
    path.write_text(yaml.safe_dump(soak, sort_keys=False))

    reference_dir = work / "uninterrupted"
    reference = start(["run", str(path), "--run-dir", str(reference_dir)])
    _, stderr = reference.communicate(timeout=600)
    if reference.returncode != 0:
        print(stderr, file=sys.stderr)
        return 1
    expected = read_state_dict(reference_dir / "last" / "model.safetensors")  # frozen file too

    rng, equal, total_kills = random.Random(args.seed), 0, 0
    for index in range(args.kills):
        run_dir = work / f"trial{index}"
        kills, mode = trial(path, run_dir, rng, args.max_delay)
        actual = read_state_dict(run_dir / "last" / "model.safetensors")
        same = actual.keys() == expected.keys() and all(
            actual[key].equal(expected[key]) for key in expected
        )
        equal += same
        total_kills += kills
        print(
            f"trial {index + 1}: {kills} kill(s), first {mode}: "
            f"{'bitwise equal' if same else 'DIFFERENT'}",
            flush=True,
        )
    print(
        f"{equal} of {args.kills} runs ({total_kills} SIGKILLs) ended bitwise equal to the "
        f"uninterrupted run ({work})"
    )
    return 0 if equal == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
