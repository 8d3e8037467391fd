"""The recipe schema: defaults, extends, overrides, errors that name the key, and its keys
mirrored by the arguments of the functions they feed."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from finetune.augment import BUILDERS, build_batch_transform, build_transforms
from finetune.config import (
    AUGMENTATIONS,
    DataConfig,
    DigitsSource,
    ExportConfig,
    FakeSource,
    FreezeConfig,
    HeadConfig,
    ImageFolderSource,
    LoadConfig,
    ManifestSource,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    SchedulerConfig,
    Section,
    TorchvisionSource,
    TrainConfig,
)
from finetune.config.augment import Augmentation, FlipArgs
from finetune.config.sources import SOURCE_CLASSES
from finetune.data import (
    Split,
    build_loader,
    build_train_sampler,
    resolve_num_workers,
    stratified_split,
)
from finetune.data import class_weights as weigh_classes
from finetune.errors import UserError
from finetune.export import export_run
from finetune.feature_cache import FeatureCache, plan_cache
from finetune.freezing import freeze
from finetune.heads import HEADS, build_head, head_options, linear_head, mlp_head
from finetune.image_cache import cache_images
from finetune.loop import FitOptions
from finetune.model import build_model
from finetune.optim import (
    build_optimizer,
    create_optimizer,
    lr_scale_factor,
    param_groups,
    training_groups,
)
from finetune.recipe import Recipe, apply_overrides, recipe_keys
from finetune.run_folder import claim_run_dir, latest_run
from finetune.runtime import Runtime, resolve_compile
from finetune.schedule import build_scheduler, schedule_span
from finetune.sources import SOURCE_KINDS, manifest, open_source
from finetune.stats import resolve_normalization
from finetune.tensorboard_log import tensorboard_log
from finetune.verify import verify_images
from finetune.weights import load_partial
from tests.conftest import REPO, make_image_folder, tiny_recipe, write_recipe


def problems(data: dict) -> list[str]:
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(data)
    return caught.value.problems


def test_defaults_fill_every_optional_key():
    recipe = Recipe.from_dict(tiny_recipe())
    assert recipe.scheduler.name == "cosine"
    assert recipe.train.grad_accum_steps == 1
    assert recipe.freeze.patterns == []
    assert recipe.output.dir == Path("checkpoints")


def test_recipe_is_immutable():
    recipe = Recipe.from_dict(tiny_recipe())
    with pytest.raises(ValidationError, match="frozen"):
        recipe.train.epochs = 5


def test_extends_merges_nested_sections(tmp_path):
    write_recipe(tmp_path / "base.yaml", tiny_recipe())
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\noptimizer: {lr: 0.5}\n")
    recipe = Recipe.load(tmp_path / "child.yaml")
    assert recipe.name == "child"
    assert recipe.optimizer.lr == 0.5
    assert recipe.optimizer.momentum == 0.9  # kept from the base


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        Recipe.load(tmp_path / "a.yaml")


def test_set_overrides_are_yaml_typed(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    recipe = Recipe.load(
        path,
        ["optimizer.lr=3e-4", "train.epochs=5", "train.clip_grad_norm=1.0", "data.augment=[vflip]"],
    )
    assert recipe.optimizer.lr == pytest.approx(3e-4)
    assert recipe.train.epochs == 5
    assert recipe.data.augment == [Augmentation("vflip", FlipArgs())]


def test_override_creates_missing_sections():
    assert apply_overrides({}, {"a.b.c": 1}) == {"a": {"b": {"c": 1}}}


def test_typo_gets_the_closest_key():
    lines = problems(tiny_recipe(optimizer={"name": "sgd", "lr": 0.1, "momentun": 0.9}))
    assert lines == ["optimizer.momentun: unknown key; did you mean 'momentum'?"]


def test_a_union_of_scalars_and_a_section_reports_the_member_the_value_was_written_for():
    """``train.cache_features`` is auto, true, false or ``{views: K}``: a mapping's problems are
    the section's, under its own keys, and a scalar's are not "not a mapping"."""
    assert problems(tiny_recipe(train={"cache_features": {"views": 0}})) == [
        "train.cache_features.views: Input should be greater than or equal to 1 (got 0)"
    ]
    assert problems(tiny_recipe(train={"cache_features": {"view": 2}})) == [
        "train.cache_features.views: required key is missing",
        "train.cache_features.view: unknown key; did you mean 'views'?",
    ]
    lines = problems(tiny_recipe(train={"cache_features": "yes"}))
    assert len(lines) == 2 and not any("dictionary" in line for line in lines)
    assert lines[0].endswith("(got 'yes'); write true or false without quotes")


def test_every_error_is_listed_by_dotted_key():
    data = tiny_recipe(train={"epochs": 0, "device": "cpu"})
    data["optimizer"]["lr"] = 0
    data["data"]["val_split"] = 1.5
    del data["data"]["val"]
    lines = problems(data)
    assert any(line.startswith("train.epochs:") for line in lines)
    assert any(line.startswith("optimizer.lr:") for line in lines)
    assert any(line.startswith("data.val_split:") for line in lines)


def test_wrong_type_names_the_key():
    lines = problems(tiny_recipe(data={"batch_size": "big"}))
    assert lines[0].startswith("data.batch_size:")


def test_missing_data_root_is_an_error(tmp_path):
    lines = problems(
        tiny_recipe(data={"train": {"type": "imagefolder", "root": str(tmp_path / "nope")}})
    )
    assert lines == [
        f"data.train.root: path does not exist: {tmp_path / 'nope'} (got '{tmp_path / 'nope'}')"
    ]


def test_unknown_augmentation_suggests_one():
    lines = problems(tiny_recipe(data={"augment": ["hflip", {"rotat": 10}]}))
    assert "did you mean 'rotate'" in lines[0]


def test_numbers_and_bools_written_as_strings_are_errors_but_set_values_are_yaml(tmp_path):
    """A recipe is typed YAML: "2" is not a number and "yes" not a bool. ``--set`` parses its
    values as YAML, so ``train.epochs=2`` is the number 2."""
    lines = problems(tiny_recipe(train={"epochs": "2"}, optimizer={"lr": 0.1, "nesterov": "yes"}))
    assert sorted(lines) == [
        "optimizer.nesterov: Input should be a valid boolean (got 'yes'); "
        "write true or false without quotes",
        "train.epochs: Input should be a valid integer (got '2'); write a number without quotes",
    ]
    recipe = Recipe.load(write_recipe(tmp_path / "r.yaml", tiny_recipe()), ["train.epochs=2"])
    assert recipe.train.epochs == 2
    assert Recipe.from_dict(tiny_recipe(optimizer={"lr": 1})).optimizer.lr == 1.0  # int is a float


def test_a_choice_typo_gets_the_closest_choice():
    lines = problems(tiny_recipe(scheduler={"name": "cosin"}, train={"precision": "bf61"}))
    assert any(
        line.startswith("scheduler.name:") and "did you mean 'cosine'?" in line for line in lines
    )
    assert any(
        line.startswith("train.precision:") and "did you mean 'bf16'?" in line for line in lines
    )


def test_every_bad_augmentation_is_reported_at_once_under_its_index():
    lines = problems(
        tiny_recipe(data={"augment": ["hflipp", "vflip", {"rotate": {"degrees": "x"}}]})
    )
    assert len(lines) == 2
    assert lines[0].startswith(
        "data.augment.0: unknown augmentation 'hflipp'; did you mean 'hflip'?"
    )
    assert lines[1].startswith("data.augment.2: rotate.degrees:")


def test_validation_source_is_required():
    data = tiny_recipe()
    del data["data"]["val"]
    assert any("data.val_split" in line for line in problems(data))


def test_resolved_recipe_round_trips(tmp_path):
    recipe = Recipe.from_dict(tiny_recipe())
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    Recipe.load(path, check_paths=False)


def test_recipe_keys_lists_nested_keys():
    keys = recipe_keys()
    assert "optimizer.param_groups" in keys and "model.load.strip_prefix" in keys


def test_interface_example_keys_are_known():
    """Keys of the documented example in the README exist in the schema."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)

    def flatten(node, prefix=""):
        for key, value in node.items():
            yield prefix + key
            if isinstance(value, dict) and key not in {"train", "val", "rename"}:
                yield from flatten(value, f"{prefix}{key}.")

    known = set(recipe_keys()) | {"extends"}
    assert [key for key in flatten(data) if key not in known] == []


# --------------------------------------------------------------------- keys mirror arguments
# Convention 4: a section's keys are the keyword arguments of the factory it feeds, one hop
# (`model:` -> build_model(**model)), with the schema's defaults: a default lives in the schema,
# and a factory that has one agrees with it. "Equal" is exact: each factory's arguments that are
# not keys of its section are listed below, with where their values come from.
ONE_FACTORY = {
    # num_classes is a key; None there means "count the data" (build_model needs the number).
    "model": (ModelConfig, build_model, {}),
    "load": (
        LoadConfig,
        load_partial,
        {
            "model": "the model built",
            "source": "model.pretrained, when a file",
            "new_head": "globs of the head build_model made (excused by strict)",
        },
    ),
    "freeze": (
        FreezeConfig,
        freeze,
        {"model": "the model built", "head": "the new head's module name, from build_model"},
    ),
    "optimizer": (
        OptimizerConfig,
        create_optimizer,
        {
            "model": "the model built",
            "batch_size": "data.batch_size",
            "grad_accum_steps": "train.grad_accum_steps",
            "world_size": "the runtime's processes",
            "unfreeze": "freeze's report: groups trained later",
        },
    ),
    "scheduler": (
        SchedulerConfig,
        build_scheduler,
        {
            "optimizer": "the optimizer built",
            "epochs": "train.epochs",
            "steps_per_epoch": "the training loader's length / train.grad_accum_steps",
            "lr_scale": "the factor of optimizer.lr_scaling",
        },
    ),
    "export": (
        ExportConfig,
        export_run,
        {
            "source": "the run folder",
            "out": "finetune export --out",
            "trust_code": "finetune export --trust-code",
        },
    ),
}
# export_run's options default to None, documented as "the run's own export: section decides":
# the schema's defaults apply through the run's recipe, not through the signature.
FROM_THE_RUN = {ExportConfig: {"fuse_bn", "formats", "tolerance"}}

# Sections read by several functions: key -> every (function, argument) that takes its value.
# "data.normalize" means: the argument `data` gets the whole section and the function reads
# `data.normalize`; "**kwargs": any keyword, passed on.
MANY_FACTORIES = {
    "head": (
        HeadConfig,
        {
            "type": [(build_head, "type")],
            "init": [(build_head, "init")],
            "args": [(build_head, "**kwargs")],  # a custom head's own options
            "pool": [(build_model, "head.pool")],  # the backbone's pooling, before the head
            "dropout": [(linear_head, "dropout"), (mlp_head, "dropout")],  # through head_options
            "hidden": [(mlp_head, "hidden")],
            "activation": [(mlp_head, "activation")],
            "norm": [(mlp_head, "norm")],
        },
    ),
    "data": (
        DataConfig,
        {
            "train": [(open_source, "source")],
            "val": [(open_source, "source")],
            "test": [(open_source, "source")],
            "val_split": [(stratified_split, "fraction")],
            "image_size": [(open_source, "image_size"), (build_transforms, "data.image_size")],
            "crop_pct": [(build_transforms, "data.crop_pct")],
            "batch_size": [
                (build_loader, "batch_size"),
                (build_train_sampler, "batch_size"),
                (lr_scale_factor, "batch_size"),
                (create_optimizer, "batch_size"),
            ],
            "eval_batch_size": [(build_loader, "batch_size")],  # None: twice batch_size
            "num_workers": [(resolve_num_workers, "num_workers")],
            "persistent_workers": [(build_loader, "persistent_workers")],
            "prefetch_factor": [(build_loader, "prefetch_factor")],
            "sampler": [(build_train_sampler, "kind")],
            "class_weights": [(weigh_classes, "choice")],
            "on_bad_image": [(Split, "on_bad_image"), (verify_images, "on_bad_image")],
            "verify": [(verify_images, "verify")],
            "augment": [(build_transforms, "data.augment"), (build_batch_transform, "augment")],
            "eval_transforms": [(build_transforms, "data.eval_transforms")],
            "normalize": [(resolve_normalization, "data.normalize")],
            "cache": [(cache_images, "data.cache")],
            "cache_max_ram_fraction": [(cache_images, "data.cache_max_ram_fraction")],
        },
    ),
    "train": (
        TrainConfig,
        {
            "epochs": [(FitOptions, "epochs"), (build_scheduler, "epochs")],
            "device": [(Runtime.create, "device")],
            "precision": [(Runtime.create, "precision")],
            "channels_last": [(Runtime.create, "channels_last")],
            "compile": [(resolve_compile, "compile")],
            "grad_accum_steps": [
                (FitOptions, "grad_accum_steps"),
                (lr_scale_factor, "grad_accum_steps"),
                (create_optimizer, "grad_accum_steps"),
            ],
            "clip_grad_norm": [(FitOptions, "clip_grad_norm")],
            "label_smoothing": [(FitOptions, "label_smoothing")],
            "sync_batchnorm": [(Runtime.prepare, "sync_batchnorm")],
            "checkpoint_every": [(FitOptions, "checkpoint_every")],
            "cache_features": [(plan_cache, "cache_features")],
            "cache_features_memory_gb": [(FeatureCache, "memory_limit_gb")],
        },
    ),
    "output": (
        OutputConfig,
        {
            "dir": [(claim_run_dir, "output_dir"), (latest_run, "output_dir")],
            "save_best": [(FitOptions, "save_best")],
            "tensorboard": [(tensorboard_log, "enabled")],
        },
    ),
    # The opener passes keywords (the other sources' openers take the section: see below).
    "manifest source": (
        ManifestSource,
        {
            "type": [(manifest, "kind")],
            "path": [(manifest, "path")],
            "path_key": [(manifest, "path_key")],
            "label_key": [(manifest, "label_key")],
        },
    ),
}

# Building blocks beneath the factories that take a section's keys under the same names: their
# defaults are the schema's too (finetune.param_groups(model, lr=0.1) groups as a recipe would).
BENEATH = [
    (OptimizerConfig, build_optimizer, {}),
    (OptimizerConfig, lr_scale_factor, {}),
    (OptimizerConfig, param_groups, {"param_groups": "rules"}),
    (OptimizerConfig, training_groups, {"param_groups": "rules"}),
    (SchedulerConfig, schedule_span, {}),
]


def named_arguments(function: Callable) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


def same_default(schema: object, factory: object) -> bool:
    """Equal, reading a list as a tuple, and None as an empty mapping or a default section."""
    if factory is None and isinstance(schema, Section):
        return schema == type(schema)()
    if factory is None and schema == {}:
        return True
    if isinstance(schema, (list, tuple)) and isinstance(factory, (list, tuple)):
        return list(schema) == list(factory)
    return schema == factory and isinstance(schema, bool) == isinstance(factory, bool)


def default_mismatches(
    section: type[Section], function: Callable, keys: dict[str, str], skip: Collection[str] = ()
) -> list[str]:
    """``section.key: schema default != function(argument=...)`` for each (key -> argument)."""
    parameters, found = named_arguments(function), []
    for key, argument in keys.items():
        field, parameter = section.model_fields[key], parameters[argument]
        if key in skip or field.is_required() or parameter.default is parameter.empty:
            continue  # a required factory argument is fine: the recipe always passes it
        if not same_default(field.default, parameter.default):
            found.append(
                f"{section.__name__}.{key}: {field.default!r} != "
                f"{function.__qualname__}({argument}={parameter.default!r})"
            )
    return found


@pytest.mark.parametrize("section, factory, not_keys", ONE_FACTORY.values(), ids=ONE_FACTORY)
def test_section_keys_are_its_factory_keywords(section, factory, not_keys):
    """`model:` -> build_model(**model): the same names, and the same defaults."""
    arguments = named_arguments(factory)
    assert set(not_keys) <= set(arguments)
    assert set(section.model_fields) == set(arguments) - set(not_keys)
    skip = FROM_THE_RUN.get(section, set())
    assert all(arguments[key].default is None for key in skip)
    keys = {key: key for key in section.model_fields}
    assert default_mismatches(section, factory, keys, skip) == []


@pytest.mark.parametrize("section, consumers", MANY_FACTORIES.values(), ids=MANY_FACTORIES)
def test_keys_of_shared_sections_are_arguments_of_the_functions_listed(section, consumers):
    assert set(consumers) == set(section.model_fields)  # every key listed, and only keys
    mismatches = []
    for key, uses in consumers.items():
        for function, argument in uses:
            parameters = named_arguments(function)
            if argument.startswith("**"):
                assert parameters[argument[2:]].kind is inspect.Parameter.VAR_KEYWORD
            elif "." in argument:  # the whole section, read as section.key
                assert argument.split(".")[0] in parameters, (key, function)
                assert argument in inspect.getsource(function), (key, function)
            else:
                assert argument in parameters, (key, function)
                mismatches += default_mismatches(section, function, {key: argument})
    assert mismatches == []


@pytest.mark.parametrize(
    "section, function, renamed", BENEATH, ids=[function.__name__ for _, function, _ in BENEATH]
)
def test_building_blocks_default_as_the_schema_does(section, function, renamed):
    arguments = named_arguments(function)
    shared = {
        key: renamed.get(key, key)
        for key in section.model_fields
        if renamed.get(key, key) in arguments
    }
    assert len(shared) >= 2
    assert default_mismatches(section, function, shared) == []


def test_built_in_heads_take_exactly_the_head_options():
    """`head_options` hands a built-in head its keys, whose defaults are the head's own."""
    for name in ("linear", "mlp"):
        arguments = named_arguments(HEADS[name])
        options = head_options(HeadConfig(type=name))
        assert set(options) == set(arguments) - {"in_features", "num_classes"}
        defaults = {key: arguments[key].default for key in options}
        assert all(same_default(options[key], defaults[key]) for key in options), name


class Reads:
    """Stands in for an argument object and records which of its keys are read."""

    def __init__(self, section: Section) -> None:
        self.section, self.read = section, set()

    def __getattr__(self, name: str) -> object:
        self.read.add(name)
        return getattr(self.section, name)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_keys_are_what_its_builder_reads(name):
    """A builder takes the argument object (its defaults are the schema's): it reads every key
    of it, and nothing else."""
    spec = AUGMENTATIONS[name]
    args = Reads(spec.args())
    BUILDERS[name](args, 32)
    assert args.read == set(spec.args.model_fields)


def source_of(cls: type[Section], tmp_path: Path) -> Section:
    """A valid source of each kind, as small as it can be."""
    folder = make_image_folder(tmp_path / "images", ["cat", "dog"], per_class=1, size=8)
    manifest_file = tmp_path / "list.csv"
    manifest_file.write_text("path,label\nimages/cat/img0.png,cat\nimages/dog/img0.png,dog\n")
    return {
        ImageFolderSource: lambda: ImageFolderSource(type="imagefolder", root=folder),
        ManifestSource: lambda: ManifestSource(type="csv", path=manifest_file),
        TorchvisionSource: lambda: TorchvisionSource(
            type="torchvision", name="MNIST", root=tmp_path
        ),
        # A seed left out is the recipe's, filled in by open_source before the opener runs.
        DigitsSource: lambda: DigitsSource(type="digits", per_class=1, seed=0),
        FakeSource: lambda: FakeSource(type="fake", num_samples=2, seed=0),
    }[cls]()


@pytest.mark.parametrize("cls", SOURCE_CLASSES, ids=lambda cls: cls.__name__)
def test_source_keys_are_what_its_opener_reads(cls, tmp_path):
    """Each source's opener (`SOURCE_KINDS`) reads every key of it; `type` chose the opener."""
    source = Reads(source_of(cls, tmp_path))
    try:
        SOURCE_KINDS[cls].open(source, "data.train", 16, None)
    except UserError:  # torchvision: nothing under root, after every key was read
        assert cls is TorchvisionSource
    assert source.read - {"type"} == set(cls.model_fields) - {"type"}
