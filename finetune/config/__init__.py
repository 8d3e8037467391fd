"""The recipe's schema, one module per section, free of torch.

``finetune.recipe.Recipe`` puts the sections together and reads them from YAML; the classes
below are also the typed arguments the building blocks take from Python.
"""

from finetune.config.augment import AUGMENTATIONS, Augmentation, AugmentSpec
from finetune.config.common import Section
from finetune.config.data import DataConfig, NormalizeStats
from finetune.config.freeze import FreezeConfig, UnfreezeStep
from finetune.config.model import HeadConfig, LoadConfig, ModelConfig
from finetune.config.optim import OptimizerConfig, ParamGroupRule
from finetune.config.schedule import SchedulerConfig
from finetune.config.sources import (
    DataSource,
    DigitsSource,
    FakeSource,
    ImageFolderSource,
    ManifestSource,
    TorchvisionSource,
)
from finetune.config.train import ExportConfig, OutputConfig, TrainConfig

__all__ = [
    "AUGMENTATIONS",
    "AugmentSpec",
    "Augmentation",
    "DataConfig",
    "DataSource",
    "DigitsSource",
    "ExportConfig",
    "FakeSource",
    "FreezeConfig",
    "HeadConfig",
    "ImageFolderSource",
    "LoadConfig",
    "ManifestSource",
    "ModelConfig",
    "NormalizeStats",
    "OptimizerConfig",
    "OutputConfig",
    "ParamGroupRule",
    "SchedulerConfig",
    "Section",
    "TorchvisionSource",
    "TrainConfig",
    "UnfreezeStep",
]
