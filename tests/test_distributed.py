"""A real 2-process job on CPU (gloo) through `finetune run --nproc 2`, against one process."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data import build_loader
from finetune.distributed import SampleKey, ShardSampler, ShuffleShardSampler
from tests.conftest import invoke_cli, make_image_folder, run_cli, tiny_recipe, write_recipe


def test_shards_of_a_global_batch_are_the_single_process_batch():
    single = list(ShuffleShardSampler(30, seed=1, batch_size=8))
    ranks = [
        list(ShuffleShardSampler(30, seed=1, batch_size=4, rank=r, world_size=2)) for r in range(2)
    ]
    assert len(single) == 24 and all(len(shard) == 12 for shard in ranks)
    for step in range(3):
        global_batch = ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]
        assert sorted(global_batch) == sorted(single[8 * step : 8 * step + 8])


def test_sample_keys_name_the_draw_whatever_the_number_of_processes():
    """(index, position in the epoch) is the same with 1 or 2 processes: so are the seeds."""
    single = ShuffleShardSampler(30, seed=1, batch_size=8)
    single.set_epoch(3)
    ranks = [ShuffleShardSampler(30, seed=1, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    for shard in ranks:
        shard.set_epoch(3)
    keys = [key for shard in ranks for key in shard]
    assert {(int(k), k.position) for k in keys} == {(int(k), k.position) for k in single}
    assert {k.rng_seed() for k in keys} == {k.rng_seed() for k in single}
    key = keys[0]
    copy = pickle.loads(pickle.dumps(key))  # as it travels to a loader worker
    assert type(copy) is SampleKey and copy.rng_seed() == key.rng_seed()
    assert key.rng_seed() != SampleKey(int(key), 1, 4, key.position).rng_seed()  # next epoch
    assert key.rng_seed(stream=1) != key.rng_seed()


@pytest.mark.parametrize("length, world_size, batches", [(6, 2, 1), (10, 2, 1), (20, 2, 2)])
def test_a_split_of_one_global_batch_or_less_still_trains(length, world_size, batches):
    """6 images, 2 processes, batch 4: each process takes one batch of 3, not none."""
    dataset = torch.utils.data.TensorDataset(torch.arange(length))
    loaders = [
        build_loader(
            dataset,
            batch_size=4,
            train=True,
            num_workers=0,
            pin_memory=False,
            sampler=ShuffleShardSampler(
                length, seed=0, batch_size=4, rank=rank, world_size=world_size
            ),
        )
        for rank in range(world_size)
    ]
    assert [len(loader) for loader in loaders] == [batches] * world_size
    assert all(len(list(loader)) == batches for loader in loaders)


def test_evaluation_shards_cover_every_image_once():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_new_epoch_new_order_same_for_the_same_epoch():
    sampler = ShuffleShardSampler(50, seed=0, batch_size=5)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    assert list(sampler) == first


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    train = make_image_folder(tmp / "train", ["a", "b", "c"], per_class=8)
    val = make_image_folder(tmp / "val", ["a", "b", "c"], per_class=3, seed=1)
    recipe = tiny_recipe(
        data={
            "train": {"type": "imagefolder", "root": str(train)},
            "val": {"type": "imagefolder", "root": str(val)},
            "batch_size": 4,
            "augment": [],
        },
        freeze={"batchnorm": "frozen"},  # batch statistics would differ between 4 and 8 images
        scheduler={"name": "cosine", "warmup_epochs": 1},
    )
    path = write_recipe(tmp / "r.yaml", recipe)
    out = tmp / "out"
    ddp = run_cli("run", str(path), "--nproc", "2", "--set", f"output.dir={out}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) with DDP over gloo" in ddp.stdout
    # --nproc 1: the same process group and DDP wrapper, in one process.
    single = run_cli(
        "run",
        str(path),
        "--nproc",
        "1",
        "--set",
        "data.batch_size=8",
        "--run-dir",
        str(tmp / "single"),
    )
    assert single.returncode == 0, single.stderr
    return Path(ddp.stdout.strip().splitlines()[-1]), tmp / "single", out, val


def test_one_run_folder_written_once(two_runs):
    ddp_dir, _, out, _ = two_runs
    assert sorted(p.name for p in (out / "tiny").iterdir()) == sorted(["latest", ddp_dir.name])
    rows = (ddp_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["effective_batch_size"] == 8
    assert summary["backend"] == "gloo"


def test_nproc_1_is_one_process_in_a_process_group(two_runs):
    _, single_dir, _, _ = two_runs
    summary = json.loads((single_dir / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["effective_batch_size"] == 8
    assert summary["backend"] == "gloo"


def test_weights_equal_a_single_process_run_with_the_same_effective_batch(two_runs):
    ddp_dir, single_dir, _, _ = two_runs
    ddp = load_file(ddp_dir / "last" / "model.safetensors")
    single = load_file(single_dir / "last" / "model.safetensors")
    assert ddp.keys() == single.keys()  # no "module." prefix from DDP
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6, msg=key)


def test_sharded_metrics_equal_a_single_process_evaluation(two_runs):
    ddp_dir, _, _, val = two_runs
    last_row = json.loads((ddp_dir / "metrics.jsonl").read_text().splitlines()[-1])
    result = invoke_cli("eval", str(ddp_dir / "last" / "model.safetensors"), str(val), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["top1"] == pytest.approx(last_row["val/top1"])
    assert report["loss"] == pytest.approx(last_row["val/loss"], rel=1e-5)


def test_resume_under_torchrun_continues_the_run(two_runs, tmp_path):
    import shutil

    ddp_dir, _, _, _ = two_runs
    copy = tmp_path / "copy"
    shutil.copytree(ddp_dir, copy)
    result = run_cli(
        "run",
        str(copy / "recipe.yaml"),
        "--nproc",
        "2",
        "--resume",
        str(copy),
        "--set",
        "train.epochs=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(row) for row in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert json.loads((copy / "summary.json").read_text())["epochs"] == 3
