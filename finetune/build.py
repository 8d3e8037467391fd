"""The construct step: from a validated recipe to every object a run needs, built once.

``build(recipe)`` is where ``finetune run``, ``finetune plan`` (``data=False``) and
``finetune lr-find`` start. The order is fixed, and seeded, so that the same recipe gives the
same head, the same split and the same batches every time: runtime -> datasets (and their
normalisation) -> model, weights, freezing -> device -> loaders -> parameter groups, optimizer
and schedule. ``optimizer.lr: auto`` runs the LR range test on what was built and then rebuilds
only the optimizer and the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune import lr_find
from finetune.augment import build_batch_transform
from finetune.config import DataConfig
from finetune.data import (
    Datasets,
    build_datasets,
    build_loader,
    build_train_sampler,
    resolve_num_workers,
)
from finetune.distributed import ShardSampler
from finetune.errors import UserError
from finetune.feature_cache import CACHE_FOLDER, FeatureCache, plan_cache
from finetune.freezing import FreezeReport, UnfreezeStage, freeze
from finetune.image_cache import cache_images
from finetune.lr_find import LRFinderResult, lr_range_test
from finetune.model import BuiltModel, build_model, check_backbone_name, pretrained_config
from finetune.optim import build_optimizer, lr_scale_factor, optimizer_arguments, training_groups
from finetune.recipe import Recipe
from finetune.runtime import Runtime, resolve_compile, seed_everything
from finetune.schedule import Schedule, build_scheduler
from finetune.sources import count_classes
from finetune.stats import with_measured_normalization
from finetune.verify import verify_images


@dataclass
class Built:
    """Everything a run is made of, before any step is taken or any file written.

    ``recipe`` is the resolved recipe: ``normalize: dataset`` and ``lr: auto`` replaced by the
    values measured for this run, as the run folder's ``recipe.yaml`` records them. Without data
    (``build(recipe, data=False)``) ``datasets`` and the loaders are ``None``.
    """

    recipe: Recipe
    runtime: Runtime
    network: BuiltModel  # the model as built (not moved, not wrapped), its head and load report
    model: nn.Module  # on the device; wrapped in DDP under torchrun
    num_classes: int
    freeze: FreezeReport
    groups: list[dict[str, Any]]  # every group the run will train, before lr_scale
    unfreeze: list[UnfreezeStage]
    lr_scale: float
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    steps_per_epoch: int
    datasets: Datasets | None = None
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    lr_found: LRFinderResult | None = field(default=None)
    features: FeatureCache | None = None  # train.cache_features (finetune.feature_cache)

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step: per-process batch x processes x accumulation steps."""
        return (
            self.recipe.data.batch_size
            * self.runtime.world_size
            * self.recipe.train.grad_accum_steps
        )

    def class_weights(self) -> torch.Tensor | None:
        """``data.class_weights`` as a tensor on the device (``None``: unweighted loss)."""
        weights = self.datasets.class_weights if self.datasets is not None else None
        return None if weights is None else weights.to(self.runtime.device)


def eval_loader(
    data: DataConfig, runtime: Runtime, dataset: Dataset, *, once: bool = False
) -> DataLoader:
    """An evaluation loader sharded over processes; ``once``: no workers kept between passes
    (for a split evaluated a single time)."""
    return build_loader(
        dataset,
        batch_size=data.eval_batch_size or 2 * data.batch_size,
        train=False,
        num_workers=resolve_num_workers(data.num_workers),
        pin_memory=runtime.pin_memory,
        persistent_workers=data.persistent_workers and not once,
        prefetch_factor=data.prefetch_factor,
        sampler=ShardSampler(len(dataset), rank=runtime.rank, world_size=runtime.world_size),
    )


def build(
    recipe: Recipe, *, data: bool = True, steps_per_epoch: int = 1, auto_lr: bool = True
) -> Built:
    """Build the recipe's runtime, data, model, optimizer and schedule.

    Args:
        data: read the data and make the loaders; without (``finetune plan``) the class count
            comes from the recipe alone and an epoch counts ``steps_per_epoch`` optimizer steps.
        auto_lr: resolve ``optimizer.lr: auto`` with the LR range test (else it is an error).

    Raises:
        UserError: anything in the recipe that does not fit the model or the data.
    """
    check_backbone_name(recipe.model.backbone)
    seed_everything(recipe.seed)
    runtime = Runtime.create(
        device=recipe.train.device,
        precision=recipe.train.precision,
        channels_last=recipe.train.channels_last,
    )
    compile_model = resolve_compile(recipe.train.compile, runtime.device)  # before reading data
    datasets = None
    if data:
        datasets = build_datasets(
            recipe.data,
            seed=recipe.seed,
            num_classes=recipe.model.num_classes,
            pretrained_cfg=pretrained_config(recipe.model.backbone),
        )
        verify_images(  # every image file, before the run folder or the model exist
            datasets,
            verify=recipe.data.verify,
            on_bad_image=recipe.data.on_bad_image,
            num_workers=resolve_num_workers(recipe.data.num_workers),
            progress=runtime.is_main,
        )
        # `normalize: dataset` is measured once: the run's recipe.yaml keeps the values.
        recipe = with_measured_normalization(recipe, datasets.normalization)
        datasets = cache_images(datasets, recipe.data, progress=runtime.is_main)
    num_classes = _num_classes(recipe, datasets)
    if recipe.freeze.unfreeze and runtime.distributed:
        raise UserError(
            "freeze.unfreeze: gradual unfreezing needs a single process; DDP fixes "
            "the set of trainable parameters when it wraps the model"
        )
    if recipe.scheduler.monitor == "val/top5" and num_classes < 5:
        raise UserError("scheduler.monitor: val/top5 is only logged with 5 or more classes")
    torch.manual_seed(recipe.seed)  # the new head starts from the same weights in every command
    network = build_model(**{**dict(recipe.model), "num_classes": num_classes})
    report = freeze(network.model, **dict(recipe.freeze), head=network.head_names)
    _check_batchnorm_batch(network.model, recipe.data.batch_size)
    model, loaders = network.model, (None, None)
    if datasets is not None:
        # Frozen BatchNorm layers compute no batch statistics: there is nothing to synchronise.
        sync_bn = recipe.train.sync_batchnorm and recipe.freeze.batchnorm != "frozen"
        model = runtime.prepare(model, sync_batchnorm=sync_bn, compile=compile_model)
        loaders = _loaders(recipe, runtime, datasets)
        steps_per_epoch = -(-len(loaders[0]) // recipe.train.grad_accum_steps)
    lr = recipe.optimizer.lr
    if lr == "auto" and not auto_lr:
        raise UserError(
            "optimizer.lr: 'auto' is found when training starts; to plan, give a "
            "number, e.g. --set optimizer.lr=0.01"
        )
    lr_scale = lr_scale_factor(
        lr_scaling=recipe.optimizer.lr_scaling,
        base_batch_size=recipe.optimizer.base_batch_size,
        batch_size=recipe.data.batch_size,
        grad_accum_steps=recipe.train.grad_accum_steps,
        world_size=runtime.world_size,
    )
    built = Built(
        recipe,
        runtime,
        network,
        model,
        num_classes,
        report,
        [],
        report.unfreeze,
        lr_scale,
        None,
        None,
        steps_per_epoch,
        datasets,  # type: ignore[arg-type]
        *loaders,
        features=_feature_cache(recipe, runtime, network, model, report, loaders),
    )
    if lr == "auto":
        built = _with_range_test_lr(built)
    return with_optimizer(
        built, 1.0 if built.recipe.optimizer.lr == "auto" else float(built.recipe.optimizer.lr)
    )


def with_optimizer(built: Built, lr: float) -> Built:
    """``built`` with parameter groups, optimizer and schedule (re)made for ``optimizer.lr``
    ``lr``; the recipe records it."""
    recipe = built.recipe
    opt = recipe.optimizer.model_copy(update={"lr": lr})
    recipe = recipe.model_copy(update={"optimizer": opt})
    groups = training_groups(
        built.network.model,
        lr=lr,
        weight_decay=opt.weight_decay,
        rules=opt.param_groups,
        no_decay=opt.no_decay,
        layer_decay=opt.layer_decay,
        unfreeze=built.unfreeze,
    )
    optimizer = build_optimizer(groups, lr_scale=built.lr_scale, **optimizer_arguments(opt))
    schedule = build_scheduler(
        optimizer,
        epochs=recipe.train.epochs,
        steps_per_epoch=built.steps_per_epoch,
        lr_scale=built.lr_scale,
        **dict(recipe.scheduler),
    )
    return replace(built, recipe=recipe, groups=groups, optimizer=optimizer, schedule=schedule)


def range_test(built: Built, **settings: Any) -> LRFinderResult:
    """The LR range test (``finetune.lr_find.lr_range_test``) on the built model and data,
    with LRs that are values of ``optimizer.lr`` (before ``lr_scaling``)."""
    if built.train_loader is None:
        raise UserError("lr-find: the range test needs the data; build with data=True")
    train = built.recipe.train
    return lr_range_test(
        built.model,
        built.optimizer,
        built.train_loader,
        built.runtime,
        reference_lr=float(built.recipe.optimizer.lr),
        grad_accum_steps=train.grad_accum_steps,
        clip_grad_norm=train.clip_grad_norm,
        label_smoothing=train.label_smoothing,
        **settings,
    )


def _with_range_test_lr(built: Built) -> Built:
    """``optimizer.lr: auto``: the range test at a reference LR of 1, then rank 0's suggestion,
    rounded to three digits for the run's ``recipe.yaml``."""
    result = range_test(
        with_optimizer(built, 1.0),
        start_lr=lr_find.START_LR,
        end_lr=lr_find.END_LR,
        steps=lr_find.STEPS,
    )
    lr = float(f"{result.suggestion:.3g}")
    lr = float(built.runtime.broadcast(lr))  # every process trains with rank 0's choice
    return replace(with_optimizer(built, lr), lr_found=result)


def _loaders(recipe: Recipe, runtime: Runtime, datasets: Datasets) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled per epoch, sharded over processes) and evaluation loader."""
    data = recipe.data
    sampler = build_train_sampler(
        data.sampler,
        datasets.train.targets,
        seed=recipe.seed,
        batch_size=data.batch_size,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    train = build_loader(
        datasets.train,
        batch_size=data.batch_size,
        train=True,
        sampler=sampler,
        seed=recipe.seed + runtime.rank,
        num_workers=resolve_num_workers(data.num_workers),
        pin_memory=runtime.pin_memory,
        persistent_workers=data.persistent_workers,
        prefetch_factor=data.prefetch_factor,
        collate_fn=build_batch_transform(data.augment, len(datasets.classes)),
    )
    val = eval_loader(data, runtime, datasets.val)
    return train, val


def _check_batchnorm_batch(model: nn.Module, batch_size: int) -> None:
    """A BatchNorm that trains needs two images or more per batch (one has no variance)."""
    training = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if batch_size == 1 and training:
        raise UserError(
            f"data.batch_size: 1 cannot train the model's {len(training)} BatchNorm layers "
            f"({training[0]}, ...): a batch of one has no variance. Set freeze.batchnorm: "
            "frozen (their statistics then stay as loaded), or a batch size of 2 or more"
        )


def _num_classes(recipe: Recipe, datasets: Datasets | None) -> int:
    """What the data found (``build_datasets`` has checked it against ``model.num_classes``);
    without data, ``model.num_classes`` or what the recipe's ``data.train`` describes."""
    if datasets is not None:
        return len(datasets.classes)
    return recipe.model.num_classes or count_classes(recipe.data.train)


def _feature_cache(
    recipe: Recipe,
    runtime: Runtime,
    network: BuiltModel,
    model: nn.Module,
    report: FreezeReport,
    loaders: tuple[DataLoader | None, DataLoader | None],
) -> FeatureCache:
    """``train.cache_features``, checked now (``true`` where it cannot hold fails before any
    file is written); the features are computed when the first cached epoch starts."""
    plan = plan_cache(
        network.model,
        network.head_names,
        cache_features=recipe.train.cache_features,
        augment=recipe.data.augment,
        unfreeze=report.unfreeze,
        world_size=runtime.world_size,
        in_features=network.in_features,
    )
    return FeatureCache(
        plan,
        model=model,
        head_names=network.head_names,
        loaders=loaders,
        runtime=runtime,
        directory=recipe.output.dir / CACHE_FOLDER,
        memory_limit_gb=recipe.train.cache_features_memory_gb,
        sources=recipe.data.model_dump(mode="json", include={"train", "val"}),
        seed=recipe.seed,
        progress=runtime.is_main,
    )
