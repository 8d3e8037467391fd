"""Training a head on features computed once (``train.cache_features``).

While nothing below the head changes from one step to the next (every parameter outside the head
frozen, BatchNorm frozen or absent, no dropout outside the head) and the training transform is
deterministic, every epoch feeds the head the same features: a linear probe spends nearly all its
time recomputing them. The cache computes them once per split, the training split with its
(deterministic) training transform and the validation split with its evaluation transform, and
then the loop trains the head alone on them (``fit(..., features=...)``): the same head module
(trained in place inside the model, so checkpoints hold the whole model), optimizer, schedule and
sampler, hence the same batches in the same order, the same metrics rows and the same checkpoints
as the uncached run, within float rounding. With gradual unfreezing the cache serves the epochs
before the first step that unfreezes something below the head; then full forward passes resume.

With random augmentations the head would see other features every epoch; ``{views: K}`` caches
K augmented views of every training image instead, view v of image i drawn as an epoch's
training sampler would draw it (``SampleKey(i, seed, v, i)``), and epoch e trains on view
(e - 1) mod K. That is not the uncached run (which draws a new view every epoch), but a fixed set
of K views per image, reproducible from the recipe's seed: a resumed run trains on the same ones.

The features are those the head receives in the model's own forward pass, captured by a hook on
its input (``head_input``), for timm and torchvision models alike. They are written once to
``<output.dir>/.feature-cache/<key>/`` (``<split>.npy``, shaped (views, images, features), and
``<split>-labels.npy``, NumPy files read back without pickle) under a key that hashes what they
depend on: the weights and modules below the head, the image files (path, size, modification
time) or the source's recipe keys, the split's indices and labels, its transform, the device
type and the precision, and with views their number and the seed. Another run over the same data
and weights (a sweep of head learning rates, a resumed run) reuses them. They are loaded into
memory when they fit ``train.cache_features_memory_gb``, else memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from rich.console import Console
from rich.progress import track
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.config.augment import Augmentation
from finetune.config.train import CachedViews
from finetune.data import Split, build_loader
from finetune.distributed import SampleKey
from finetune.errors import UserError
from finetune.freezing import UnfreezeStage
from finetune.runtime import Runtime
from finetune.sources import ImageFiles
from finetune.weights import tensors_checksum

CACHE_FOLDER = ".feature-cache"  # under output.dir
SPLITS = ("train", "val")
SHOWN = 3  # names quoted in a reason


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class CachePlan:
    """Whether the cache serves a run, for which epochs, and why not.

    Attributes:
        cache_features: the recipe's ``train.cache_features`` (``"auto"``, ``True``, ``False``,
            or ``{views: K}``).
        reasons: what keeps the cache from serving the first epoch (empty: nothing).
        until: the first epoch that unfreezes a parameter below the head (``None``: none does);
            from there on, epochs run full forward passes.
        feature_bytes: what one image's features take (float32), per view.
    """

    cache_features: bool | str | CachedViews
    reasons: tuple[str, ...] = ()
    until: int | None = None
    feature_bytes: int = 0

    @property
    def used(self) -> bool:
        return self.cache_features is not False and not self.reasons

    @property
    def views(self) -> int | None:
        """How many augmented views of each training image are cached (``None``: the features
        of the deterministic training transform)."""
        views = self.cache_features
        return views.views if isinstance(views, CachedViews) else None

    def serves(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) trains the head on cached features."""
        return self.used and (self.until is None or epoch < self.until)

    def to_dict(self, epochs: int) -> dict[str, Any]:
        """As ``finetune plan --json`` shows it: ``epochs`` is [first, last] served, or null."""
        last = epochs if self.until is None else min(epochs, self.until - 1)
        setting = self.cache_features
        return {
            "setting": setting.model_dump() if isinstance(setting, CachedViews) else setting,
            "used": self.used,
            "epochs": [1, last] if self.used else None,
            "reasons": list(self.reasons),
            "bytes_per_image": self.feature_bytes,
        }

    def describe(self, epochs: int) -> str:
        """One line for ``finetune plan``."""
        setting = f"train.cache_features: {_setting(self.cache_features)}"
        if self.cache_features is False:
            return f"{setting} (every epoch runs the whole model)"
        if self.reasons:
            return f"{setting}, not used: " + "; ".join(self.reasons)
        first, last = self.to_dict(epochs)["epochs"]
        served = f"epochs {first}-{last} of {epochs} train the head on features computed once"
        if self.views is None:
            return f"{setting} ({served}, {self.feature_bytes:,} bytes per image)"
        return (
            f"{setting} ({served}: {self.views} augmented views of each training image, one per "
            f"epoch in turn, {self.feature_bytes:,} bytes per image and view)"
        )


def _setting(cache_features: bool | str | CachedViews) -> str:
    """The setting as the recipe writes it: ``auto``, ``true``, ``{views: 3}``."""
    if isinstance(cache_features, CachedViews):
        return f"{{views: {cache_features.views}}}"
    return str(cache_features).lower()


def plan_cache(
    model: nn.Module,
    head_names: Sequence[str],
    *,
    cache_features: bool | str | CachedViews,
    augment: Sequence[Augmentation],
    unfreeze: Sequence[UnfreezeStage],
    world_size: int,
    in_features: int,
) -> CachePlan:
    """Check whether features can be cached for ``model`` (frozen as it will start training).

    Args:
        cache_features: ``"auto"`` uses the cache when every condition holds; ``True`` requires
            it; ``False`` turns it off; ``{views: K}`` requires it with K augmented views.
        augment: ``data.augment``: each must be deterministic (the registry says which are),
            or with views act on one image at a time (not mixup, cutmix).
        unfreeze: the gradual-unfreezing stages; the first that unfreezes a parameter below the
            head ends the cached epochs.

    Raises:
        UserError: ``cache_features`` is ``True`` or views and a condition fails; the message
            names each one (``data.augment: hflip is random``).
    """
    if cache_features is False:
        return CachePlan(False)
    views = cache_features.views if isinstance(cache_features, CachedViews) else None
    reasons = _augment_obstacles(augment, views) + _obstacles(model, head_names, world_size)
    below = [s for s in unfreeze if any(not _in_head(n, head_names) for n in s.names)]
    until = min((stage.epoch for stage in below), default=None)
    if until == 1:
        patterns = ", ".join(p for s in below if s.epoch == 1 for p in s.patterns)
        reasons.append(f"freeze.unfreeze: {patterns} train from epoch 1")
    if cache_features != "auto" and reasons:
        setting = _setting(cache_features)
        raise UserError(f"train.cache_features: {setting}, but " + "; ".join(reasons))
    return CachePlan(cache_features, tuple(reasons), until, 4 * in_features)


def _augment_obstacles(augment: Sequence[Augmentation], views: int | None) -> list[str]:
    """Why ``data.augment`` keeps the features from being cached: without views, any random
    augmentation; with views, one that mixes a batch's images, or none random at all."""
    random = [item.name for item in augment if not item.spec.deterministic]
    if views is None:
        verb = "is" if len(random) == 1 else "are"
        return [f"data.augment: {', '.join(random)} {verb} random"] if random else []
    mixing = [item.name for item in augment if item.spec.stage == "batch"]
    if mixing:
        verb = "mixes" if len(mixing) == 1 else "mix"
        return [f"data.augment: {', '.join(mixing)} {verb} the images of a batch, not one image"]
    if not random and views > 1:
        return ["data.augment: nothing is random, so every view would be the same; use true"]
    return []


def _obstacles(model: nn.Module, head_names: Sequence[str], world_size: int) -> list[str]:
    """Why the head would not see the same features every epoch (or why the cache cannot
    train it): one phrase per condition that fails, naming the key to change."""
    found = []
    if world_size > 1:
        found.append(f"--nproc {world_size}: the cache trains the head in a single process")
    if len(head_names) != 1:
        found.append(f"model: {', '.join(head_names)}: two heads fed different features")
    training = [n for n, p in model.named_parameters() if p.requires_grad]
    training = [n for n in training if not _in_head(n, head_names)]
    if training:
        found.append(
            f"freeze: {len(training)} parameter tensors below the head train "
            f"({_some(training)}); freeze all but the head, e.g. freeze.until: {head_names[0]}"
        )
    return found + _changing_in_training(model, head_names)


def _changing_in_training(model: nn.Module, head_names: Sequence[str]) -> list[str]:
    """Layers below the head that act differently in training mode: BatchNorm updating its
    statistics, dropout and drop-path drawing masks (module or timm's ``drop_rate``)."""
    was_training = model.training
    model.train()  # as the loop will; frozen BatchNorm layers stay in eval mode
    below = [(n, m) for n, m in model.named_modules() if not _in_head(n, head_names)]
    batchnorms = [n for n, m in below if isinstance(m, _BatchNorm) and m.training]
    random = [n for n, m in below if _draws_masks(m)]
    model.train(was_training)
    found = []
    if batchnorms:
        found.append(
            f"freeze.batchnorm: train updates the statistics of {len(batchnorms)} BatchNorm "
            f"layers below the head ({_some(batchnorms)}); set freeze.batchnorm: frozen"
        )
    drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)  # timm's dropout before the head
    if random or drop_rate > 0:
        where = _some(random) if random else f"drop_rate {drop_rate:g}"
        found.append(f"model: dropout or drop-path below the head ({where}) is random")
    return found


def _draws_masks(module: nn.Module) -> bool:
    if isinstance(module, _DropoutNd):
        return module.p > 0
    return float(getattr(module, "drop_prob", 0.0) or 0.0) > 0  # timm's DropPath, DropBlock


def _in_head(name: str, head_names: Sequence[str]) -> bool:
    return any(name == head or name.startswith(f"{head}.") for head in head_names)


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


# ------------------------------------------------------------------------------ the features
def head_input(
    model: nn.Module, head_names: Sequence[str]
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The head, and a function from a batch of images to the features the head receives.

    The model runs its own forward pass and a hook captures the head's input: whatever pools,
    flattens or normalises between the backbone and the head (timm's ``forward_head`` with
    ``pre_logits``, torchvision's ``avgpool`` + ``flatten``), the cached features are what the
    uncached run's head sees.
    """
    (name,) = head_names
    head = model.get_submodule(name)

    def features(images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            model(images)
        finally:
            hook.remove()
        if len(captured) != 1 or captured[0].ndim != 2:
            raise UserError(
                f"train.cache_features: the head {name} is not called once on (batch, features) "
                "in this model's forward pass; set train.cache_features: false"
            )
        return captured[0]

    return head, features


class HeadOnFeatures(nn.Module):
    """The model's head (the same module, trained in place) fed cached features.

    Feature batches come shaped ``(batch, features, 1, 1)``, like images, so that the runtime moves
    them as it moves images (``channels_last`` included).
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.flatten(1))


class CachedFeatures(Dataset):
    """One split's features, shaped (views, images, features), and labels; a batch of indices
    gives one batch of tensors from view ``view`` (``DataLoader`` calls ``__getitems__``),
    features shaped ``(batch, features, 1, 1)``."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features, self.labels = features, labels
        self.view = 0

    @property
    def views(self) -> int:
        return len(self.features)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        features = torch.from_numpy(np.ascontiguousarray(self.features[self.view][rows]))
        return features[:, :, None, None], torch.from_numpy(self.labels[rows])


def _whole_batch(batch: Any) -> Any:
    return batch  # CachedFeatures.__getitems__ made it


@dataclass(frozen=True)
class EpochInputs:
    """What an epoch trains and evaluates: the model and its loaders, or on a cached epoch the
    head and loaders over the cached features."""

    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader


class FeatureCache:
    """The cache of one run: computes (or finds) the features when the first served epoch starts.

    Args:
        plan: ``plan_cache``'s verdict.
        model: the model on its device; its head trains in place.
        loaders: the run's training and validation loaders (``None`` without data): cached
            epochs use their samplers, batch sizes and ``drop_last``, so they see the same
            batches; the features are computed with the validation loader's batch size and
            workers.
        directory: where cached features live (``<output.dir>/.feature-cache``).
        memory_limit_gb: features larger than this are memory-mapped, not loaded.
        sources: the recipe keys of the data sources (part of the key: generated and
            torchvision sources have no files to look at).
        seed: the recipe's seed, from which the views of the training images are drawn.
        progress: show a progress bar and a line on what was computed or reused.
    """

    def __init__(
        self,
        plan: CachePlan,
        *,
        model: nn.Module,
        head_names: Sequence[str],
        loaders: tuple[DataLoader | None, DataLoader | None],
        runtime: Runtime,
        directory: Path,
        memory_limit_gb: float,
        sources: Mapping[str, Any],
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.plan = plan
        self.model, self.head_names, self.runtime = model, tuple(head_names), runtime
        self.train_loader, self.val_loader = loaders
        self.directory, self.memory_limit = Path(directory), memory_limit_gb * 1e9
        self.sources, self.seed, self.progress = dict(sources), seed, progress
        self.folder: Path | None = None  # where the features of this run are, once known
        self.computed = False  # whether this run computed them (else it found them there)
        self._inputs: EpochInputs | None = None

    def inputs(self, epoch: int) -> EpochInputs | None:
        """The head and feature loaders for ``epoch`` (training on view (epoch - 1) mod K), or
        ``None`` when it runs full forward passes (the features are then released)."""
        if not self.plan.serves(epoch) or self.train_loader is None or self.val_loader is None:
            self._inputs = None
            return None
        if self._inputs is None:
            stored = self._stored(
                {"train": self.train_loader.dataset, "val": self.val_loader.dataset}
            )
            head, _ = head_input(self.runtime.unwrap(self.model), self.head_names)
            self._inputs = EpochInputs(
                HeadOnFeatures(head),
                _loader_like(self.train_loader, stored["train"]),
                _loader_like(self.val_loader, stored["val"]),
            )
        train = self._inputs.train_loader.dataset
        assert isinstance(train, CachedFeatures)
        train.view = (epoch - 1) % train.views
        return self._inputs

    def _stored(self, splits: Mapping[str, Split]) -> dict[str, CachedFeatures]:
        """The features of ``splits``: found under their key, or computed and stored there."""
        views = (self.plan.views, self.seed) if self.plan.views is not None else None
        self.folder = self.directory / cache_key(
            self.model, self.head_names, splits, self.runtime, self.sources, views
        )
        started = time.perf_counter()
        found = self._load()
        if found is None:
            self._compute(splits)
            found = self._load()
            assert found is not None
        stored, size, mapped = found
        images = " + ".join(f"{len(stored[split])} {split}" for split in SPLITS)
        if self.plan.views is not None:
            images = f"{self.plan.views} view{'s' if self.plan.views > 1 else ''} of {images}"
        done = "computed" if self.computed else "reused"
        self._say(
            f"{done} the features of {images} images in {time.perf_counter() - started:.1f} s: "
            f"{_size(size)}, {'memory-mapped' if mapped else 'in memory'}, {self.folder}"
        )
        return stored

    def _load(self) -> tuple[dict[str, CachedFeatures], int, bool] | None:
        """The stored features (``None``: not there), their size and whether they are
        memory-mapped (larger than the memory limit) rather than loaded."""
        assert self.folder is not None
        files = [self.folder / f"{split}{end}.npy" for split in SPLITS for end in ("", "-labels")]
        if not all(path.is_file() for path in files):
            return None
        size = sum(path.stat().st_size for path in files)
        mode = "r" if size > self.memory_limit else None
        arrays = [np.load(path, mmap_mode=mode, allow_pickle=False) for path in files]
        stored = {
            split: CachedFeatures(*arrays[2 * i : 2 * i + 2]) for i, split in enumerate(SPLITS)
        }
        return stored, size, mode is not None

    def _compute(self, splits: Mapping[str, Split]) -> None:
        """Compute every split's features into a temporary folder, then rename it into place
        (a run killed meanwhile leaves nothing a later run would take for complete)."""
        assert self.folder is not None and self.val_loader is not None
        self.computed = True
        staging = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.tmp")
        try:
            staging.mkdir(parents=True, exist_ok=True)
            model = self.runtime.unwrap(self.model)
            for name, split in splits.items():
                views = self.plan.views if name == "train" else None
                self._extract(model, self._view_loaders(split, views), staging, name)
            try:
                staging.rename(self.folder)
            except OSError:  # another run computed the same features first: use theirs
                if not self.folder.is_dir():
                    raise
        except OSError as error:
            raise UserError(
                f"train.cache_features: cannot write {staging} ({error.strerror or error}); "
                "free space under output.dir or set train.cache_features: false"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _view_loaders(self, split: Split, views: int | None) -> list[DataLoader]:
        """One loader over ``split`` in order per view: ``views`` loaders drawing view v of
        image i as ``SampleKey(i, seed, v, i)`` seeds it, or one through the (deterministic)
        transform as it is."""
        assert self.val_loader is not None
        samplers = (
            [None]
            if views is None
            else [_ViewSampler(len(split), self.seed, v) for v in range(views)]
        )
        return [
            build_loader(
                split,
                batch_size=self.val_loader.batch_size or 1,
                train=False,
                num_workers=self.val_loader.num_workers,
                pin_memory=self.val_loader.pin_memory,
                sampler=sampler,
                persistent_workers=False,
            )
            for sampler in samplers
        ]

    def _extract(
        self, model: nn.Module, loaders: Sequence[DataLoader], folder: Path, split: str
    ) -> None:
        """``<split>.npy`` (float32, shaped (views, images, features): one loader per view)
        and ``<split>-labels.npy``."""
        _, features_of = head_input(model, self.head_names)
        was_training = model.training
        model.eval()
        out, labels = None, []
        # fork_rng: computing the features draws nothing from the generators training uses
        with torch.inference_mode(), self.runtime.autocast(), torch.random.fork_rng(devices=[]):
            for view, loader in enumerate(loaders):
                start = 0
                for images, targets in self._track(loader, _computing(split, view, len(loaders))):
                    images, targets = self.runtime.to_device(images, targets)
                    batch = features_of(images).float().cpu().numpy()
                    if out is None:
                        shape = (len(loaders), len(loader.dataset), batch.shape[1])
                        out = open_memmap(folder / f"{split}.npy", "w+", np.float32, shape)
                    out[view, start : start + len(batch)] = batch
                    start += len(batch)
                    if view == 0:
                        labels.append(targets.cpu().numpy())
        model.train(was_training)
        assert out is not None
        out.flush()
        del out
        np.save(folder / f"{split}-labels.npy", np.concatenate(labels).astype(np.int64))

    def _track(self, loader: DataLoader, description: str) -> Iterator[Any]:
        show = self.progress and sys.stderr.isatty()
        console = Console(stderr=True)
        return iter(track(loader, description, transient=True, console=console, disable=not show))

    def _say(self, message: str) -> None:
        if self.progress:
            console = Console(stderr=True)
            console.print(f"train.cache_features: {message}", highlight=False, soft_wrap=True)


def _computing(split: str, view: int, views: int) -> str:
    return f"computing {split} features" + (f" (view {view + 1} of {views})" if views > 1 else "")


class _ViewSampler(Sampler[int]):
    """The positions of a split in order, as ``SampleKey``s of view ``view``: ``Split`` seeds
    image i's augmentations from (seed, view, i), as a training sampler's epoch ``view`` would
    at position i."""

    def __init__(self, size: int, seed: int, view: int) -> None:
        self.size, self.seed, self.view = size, seed, view

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return (SampleKey(i, self.seed, self.view, i) for i in range(self.size))


def _loader_like(loader: DataLoader, features: CachedFeatures) -> DataLoader:
    """A loader over ``features`` with ``loader``'s sampler (shared: the loop sets its epoch),
    batch size and ``drop_last``: the same batches of the same images."""
    return DataLoader(
        features,
        batch_size=loader.batch_size,
        sampler=loader.sampler,
        drop_last=loader.drop_last,
        collate_fn=_whole_batch,
        generator=torch.Generator(),  # iterating draws its seed from here, not the global RNG
    )


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


# ------------------------------------------------------------------------------------ the key
def cache_key(
    model: nn.Module,
    head_names: Sequence[str],
    splits: Mapping[str, Split],
    runtime: Runtime,
    sources: Mapping[str, Any],
    views: tuple[int, int] | None = None,
) -> str:
    """A hash of everything the features depend on (see the module's docstring); ``views``:
    how many views of the training images, and the seed they are drawn from."""
    model = runtime.unwrap(model)
    digest = hashlib.sha256()

    def add(*values: Any) -> None:
        digest.update(json.dumps(values, default=str).encode() + b"\n")

    below = {k: v for k, v in model.state_dict().items() if not _in_head(k, head_names)}
    add("weights", tensors_checksum(below, {}))
    for name, module in model.named_modules():
        if not _in_head(name, head_names):
            add("module", name, type(module).__qualname__, module.extra_repr())
    add("runtime", runtime.device.type, runtime.precision, runtime.channels_last)
    add("sources", sources)
    add("layout", "views-images-features", views)
    for name, split in splits.items():
        add("split", name, _describe(split.transform), split.indices, split.targets)
        if isinstance(split.source, ImageFiles):
            for index in split.indices:
                path = Path(split.source.samples[index][0])
                stat = path.stat()
                add(str(path), stat.st_size, stat.st_mtime_ns)
    return digest.hexdigest()[:24]


def _describe(transform: Any) -> Any:
    """A transform as data: a pipeline step by step, a torchvision transform by its repr (its
    arguments), another object by its class and attributes (a default repr would show only its
    address, which changes from run to run)."""
    if isinstance(getattr(transform, "transforms", None), (list, tuple)):  # Compose, RandomApply
        return [type(transform).__qualname__, [_describe(t) for t in transform.transforms]]
    if isinstance(transform, nn.Module):
        return repr(transform)
    if hasattr(transform, "__dict__"):
        attributes = sorted(vars(transform).items())
        return [type(transform).__qualname__, {k: _describe(v) for k, v in attributes}]
    return repr(transform)
