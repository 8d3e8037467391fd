"""Hostile files: nothing a file says is executed, and every bad file exits 2 naming it.

Each attack is a real file that would run code (create a marker file, print) if finetune ran it:
pickles as weights and as training state, a TorchScript export whose ``forward`` writes a file,
model cards and saved recipes naming callables, and randomly damaged safetensors files. The
control cases show the payloads are live: loading them the unsafe way does run them. The first
instance of each kind of attack (a pickle, a TorchScript program, a card naming code, a recipe
naming code, a damaged export) runs ``python -m finetune`` as a real process; its variants
(another command, another damage, another name) run the same command line in this process
(``invoke_cli``).
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import struct
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune.errors import UserError
from finetune.inference import CARD_KEY, load_exported, load_trained, predict_images
from finetune.recipe import Recipe, check_imports
from finetune.weights import load_partial, read_safetensors, read_state_dict, write_safetensors
from tests.conftest import cli, invoke_cli, make_image_folder, run_cli, tiny_recipe, write_recipe

CLASSES = ["class_0", "class_1", "class_2"]  # the fake dataset's class names
ADVICE = "weights_only=False"  # torch's advice, which must never reach the user


class Trained(NamedTuple):
    recipe: Path  # the user's own recipe
    run: Path  # a run folder trained one epoch
    export: Path  # its export: model.safetensors + model.torchscript.pt
    images: Path  # an image folder with the model's classes


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("security")
    recipe = write_recipe(root / "tiny.yaml", tiny_recipe(train={"epochs": 1, "device": "cpu"}))
    # in-process: these are the setting, not what is tested
    cli("run", str(recipe), "--run-dir", str(root / "run"))
    cli(
        "export",
        str(root / "run"),
        "--format",
        "safetensors,torchscript",
        "--out",
        str(root / "export"),
    )
    images = make_image_folder(root / "images", CLASSES, per_class=2)
    return Trained(recipe, root / "run", root / "export", images)


def an_image(trained: Trained) -> str:
    return str(next((trained.images / CLASSES[0]).iterdir()))


def copy_run(trained: Trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained.run, tmp_path / "run", symlinks=True))


def assert_refused(result, path: Path | str, *, says: str = "") -> None:
    """Exit 2, the file named, no traceback, and never torch's advice to unpickle anyway."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert str(path) in result.stderr, result.stderr
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert ADVICE not in result.stderr + result.stdout


# --------------------------------------------------------------------------------- pickles
class _Payload:
    """Unpickling this runs Python code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_the_pickle_payload_is_live(tmp_path):
    """The control: plain unpickling runs it, so its absence below means it was refused."""
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # noqa: S301
    assert (tmp_path / "control").exists()


def _pickles(tmp_path: Path, marker: Path) -> dict[str, Path]:
    state = {"fc.weight": torch.zeros(3, 4)}
    files = {
        "nested": ({"state_dict": state, "extra": _Payload(marker)}, torch.save),
        "top_level": (_Payload(marker), torch.save),
        "plain_pickle": (
            _Payload(marker),
            lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
        ),
    }
    paths = {}
    for name, (obj, save) in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        save(obj, paths[name])
    return paths


@pytest.mark.parametrize("kind", ["nested", "top_level", "plain_pickle"])
def test_a_pickle_that_runs_code_is_refused_as_weights(tmp_path, kind):
    marker = tmp_path / "marker"
    path = _pickles(tmp_path, marker)[kind]
    with pytest.raises(UserError) as error:
        load_partial(torch.nn.Linear(4, 3), path)
    assert str(path) in str(error.value) and ADVICE not in str(error.value)
    assert not marker.exists()


def test_predict_refuses_a_pickle_that_runs_code_as_a_runs_weights(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    weights = _pickles(run, marker)["nested"]
    result = run_cli("predict", str(weights), an_image(trained))
    assert_refused(result, weights, says="refused to load: unpickling it would run code")
    assert "(Unsupported global: GLOBAL exec was not an allowed global" in result.stderr
    assert "still be loaded" not in result.stderr and "\x1b[" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated", "json"])
def test_resume_refuses_a_hostile_or_damaged_state_file(trained, tmp_path, damage):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    checkpoint = (run / "last").resolve()
    name = "state.json" if damage == "json" else "state.safetensors"
    target = checkpoint / name
    if damage == "pickle":
        torch.save({"optimizer": _Payload(marker)}, target)
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    result = invoke_cli("run", str(trained.recipe), "--resume", str(run))  # predict's variant
    assert_refused(result, name)
    assert not marker.exists()


# ------------------------------------------------------------------------------ TorchScript
class _WritesAFile(torch.nn.Module):
    """A TorchScript program: its ``forward`` creates ``path`` (TorchScript can write files)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
        return images.mean(dim=(2, 3)) + written.sum() * 0


@pytest.fixture
def hostile_torchscript(trained, tmp_path) -> tuple[Path, Path]:
    """An export folder whose TorchScript file writes a marker when run, with our card inside,
    and no safetensors file; the file and the marker's path."""
    folder = Path(shutil.copytree(trained.export, tmp_path / "export"))
    (folder / "model.safetensors").unlink()
    _, metadata = read_safetensors(trained.export / "model.safetensors")
    marker = tmp_path / "marker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        program = torch.jit.script(_WritesAFile(str(marker)))
        path = folder / "model.torchscript.pt"
        torch.jit.save(program, str(path), _extra_files={f"{CARD_KEY}.json": metadata[CARD_KEY]})
    return path, marker


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_torchscript_file_is_refused_without_trust_code(trained, hostile_torchscript, command):
    path, marker = hostile_torchscript
    target = an_image(trained) if command == "predict" else str(trained.images)
    result = (run_cli if command == "eval" else invoke_cli)(command, str(path), target)
    assert_refused(result, path, says="loading TorchScript runs code stored in the file")
    assert "--trust-code" in result.stderr and "model.safetensors" in result.stderr
    assert not marker.exists()
    with pytest.raises(UserError, match="has no model.safetensors"):  # a folder: its safetensors
        load_trained(path.parent, device="cpu")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trust_code_runs_the_torchscript_file(trained, hostile_torchscript):
    """The control: the file is a live program, and --trust-code is what lets it run."""
    path, marker = hostile_torchscript
    model = load_trained(path, device="cpu", trust_code=True)
    predict_images(model, [Path(an_image(trained))])
    assert marker.exists()


# ------------------------------------------------------------------------ cards and recipes
HOSTILE_MODULE = """
from pathlib import Path
from torch import nn

Path({marker!r}).touch()  # a side effect of importing this module


class Head(nn.Linear):
    def __init__(self, in_features, num_classes, **kwargs):
        super().__init__(in_features, num_classes)
"""


def _export_naming(trained: Trained, folder: Path, head_type: str, *, in_recipe: bool) -> Path:
    """A copy of the safetensors export whose card names ``head_type`` as the head (in the
    card's head, or only in the recipe inside the card), rewritten with a valid checksum."""
    tensors, metadata = read_safetensors(trained.export / "model.safetensors")
    card = json.loads(metadata[CARD_KEY])
    recipe = yaml.safe_load(card["recipe"])
    recipe["model"]["head"]["type"] = head_type
    card["recipe"] = yaml.safe_dump(recipe)
    if not in_recipe:
        card["head"]["type"] = head_type
    folder.mkdir()
    path = folder / "model.safetensors"
    write_safetensors(tensors, path, {CARD_KEY: json.dumps(card)})
    return path


def test_a_card_naming_builtins_print_is_refused_and_nothing_is_printed(trained, tmp_path):
    path = _export_naming(trained, tmp_path / "export", "builtins:print", in_recipe=False)
    result = invoke_cli("predict", str(path), an_image(trained))  # the next test's variant
    assert_refused(result, path, says="'builtins:print'")
    assert "--trust-code" in result.stderr
    assert result.stdout == ""


def test_a_card_naming_a_module_with_side_effects_never_imports_it(trained, tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "hostile_head.py").write_text(HOSTILE_MODULE.format(marker=str(marker)))
    path = _export_naming(trained, tmp_path / "a", "hostile_head:Head", in_recipe=False)
    result = run_cli("eval", str(path), str(trained.images), env={"PYTHONPATH": str(tmp_path)})
    assert_refused(result, path, says="hostile_head:Head")
    assert not marker.exists()
    # Named only by the recipe inside the card: refused too.
    path = _export_naming(trained, tmp_path / "b", "hostile_head:Head", in_recipe=True)
    with pytest.raises(UserError, match="model.head.type: 'hostile_head:Head'"):
        load_exported(path, device="cpu")
    assert not marker.exists()


def test_trust_code_imports_the_head_a_card_names(trained, tmp_path, monkeypatch):
    """The control: the module is importable, and --trust-code is what lets the card use it."""
    marker = tmp_path / "marker"
    (tmp_path / "hostile_head.py").write_text(HOSTILE_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hostile_head", raising=False)
    path = _export_naming(trained, tmp_path / "export", "hostile_head:Head", in_recipe=False)
    with pytest.raises(UserError, match="hostile_head:Head"):
        load_exported(path, device="cpu")
    assert not marker.exists()
    load_exported(path, device="cpu", trust_code=True)
    assert marker.exists()


def _run_naming_os_system(trained: Trained, tmp_path: Path) -> Path:
    run = copy_run(trained, tmp_path)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["scheduler"] = {**saved["scheduler"], "name": "lambda", "lambdas": "os:system"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    Recipe.load(run / "recipe.yaml", check_paths=False)  # still a valid recipe
    return run


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_run_whose_recipe_names_os_system_is_refused(trained, tmp_path, command):
    run = _run_naming_os_system(trained, tmp_path)
    target = an_image(trained) if command == "predict" else str(trained.images)
    result = (run_cli if command == "eval" else invoke_cli)(command, str(run), target)
    assert_refused(result, run / "recipe.yaml", says="scheduler.lambdas: 'os:system'")


def test_resume_refuses_a_saved_recipe_naming_code_the_users_recipe_does_not(trained, tmp_path):
    run = _run_naming_os_system(trained, tmp_path)
    result = invoke_cli("run", str(trained.recipe), "--resume", str(run))  # eval's variant
    assert_refused(result, run / "recipe.yaml", says="'os:system'")


def test_check_imports_allows_what_the_users_own_recipe_names(tmp_path):
    mine = tiny_recipe(
        model={"head": {"type": "my_heads:Cosine"}},
        scheduler={"name": "lambda", "lambdas": {"default": "my_lr:warm"}},
    )
    user = Recipe.from_dict(mine, check_paths=False)
    check_imports(user, source="saved.yaml", allowed=user)  # the same paths: allowed
    check_imports(Recipe.from_dict(tiny_recipe(), check_paths=False), source="saved.yaml")
    saved = Recipe.from_dict(
        {**mine, "scheduler": {"name": "lambda", "lambdas": "os:system"}}, check_paths=False
    )
    with pytest.raises(UserError, match="saved.yaml") as error:
        check_imports(saved, source="saved.yaml", allowed=user)
    assert error.value.problems == ["scheduler.lambdas: 'os:system'"]
    with pytest.raises(UserError, match="model.head.type: 'my_heads:Cosine'"):
        check_imports(saved, source="saved.yaml")
    check_imports(saved, source="saved.yaml", trust_code=True)


# -------------------------------------------------------------------------------- safetensors
def _header_length(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("region", ["anywhere", "header"])
def test_fuzzed_safetensors_load_identically_or_are_refused(trained, tmp_path, region):
    """20 seeded one-byte mutations each: the same tensors, or a UserError naming the file."""
    original = trained.export / "model.safetensors"
    expected = load_file(original)
    data, end = original.read_bytes(), _header_length(original)
    path = tmp_path / "model.safetensors"
    outcomes = []
    for seed in range(20):
        rng = random.Random(seed)
        position = rng.randrange(len(data) if region == "anywhere" else end)
        mutated = bytearray(data)
        mutated[position] = (mutated[position] + rng.randrange(1, 256)) % 256
        path.write_bytes(mutated)
        try:
            model = load_exported(path, device="cpu").model
        except UserError as error:
            assert str(path) in str(error), (seed, position, str(error))
            outcomes.append("refused")
            continue
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys(), (seed, position)
        for key, tensor in expected.items():  # bit-identical, dtype included
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
        outcomes.append("identical")
    assert outcomes.count("refused") >= 10, outcomes


def test_a_damaged_export_exits_2_naming_it(trained, tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytearray((trained.export / "model.safetensors").read_bytes())
    data[-100] ^= 0x40  # one bit of one weight
    path.write_bytes(data)
    result = run_cli("predict", str(path), an_image(trained))
    assert_refused(result, path, says="do not match the checksum")


def _as_int32(path: Path) -> str:
    """Change the first F32 tensor of the header to I32 (same length: the file stays valid);
    the name of that tensor."""
    data = path.read_bytes()
    header = json.loads(data[8 : _header_length(path)])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    entry = json.dumps(header[name], separators=(",", ":")).encode()
    changed = entry.replace(b'"F32"', b'"I32"')
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, changed))
    return name


def test_an_f32_to_i32_header_edit_of_an_export_exits_2(trained, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(trained.export / "model.safetensors", path)
    _as_int32(path)
    result = invoke_cli("predict", str(path), an_image(trained))  # a damaged export's variant
    assert_refused(result, path)


def test_an_f32_to_i32_header_edit_is_refused_without_a_checksum(trained, tmp_path):
    """A file without our checksum (written by other tools) is checked against the model."""
    run = copy_run(trained, tmp_path)
    weights = run / "best" / "model.safetensors"
    save_file(load_file(weights), weights.resolve())  # the same tensors, no checksum
    name = _as_int32(weights.resolve())
    with pytest.raises(UserError, match=re.escape(str(weights))) as error:
        load_trained(run, device="cpu")
    assert error.value.problems == [f"{name}: int32 in the file, but the model holds float32"]


def test_non_finite_weights_are_refused_naming_the_tensor(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    weights = run / "best" / "model.safetensors"
    tensors = load_file(weights)
    tensors["fc.weight"][0, 0] = float("inf")
    save_file(tensors, weights.resolve())
    with pytest.raises(UserError, match=re.escape(str(weights))) as error:
        load_trained(run, device="cpu")
    assert error.value.problems == ["fc.weight: holds NaN or infinite values"]
    with pytest.raises(UserError, match="fc.weight: holds NaN"):
        load_partial(load_trained(trained.run, device="cpu").model, weights)


def test_write_safetensors_records_a_checksum_that_reading_verifies(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors({"w": torch.arange(6.0).reshape(2, 3)}, path, {"epoch": "3"})
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert metadata["epoch"] == "3" and len(metadata["finetune_sha256"]) == 64
    data = path.read_bytes().replace(b'"epoch":"3"', b'"epoch":"4"')  # metadata is covered
    path.write_bytes(data)
    with pytest.raises(UserError, match=re.escape(f"{path}: damaged or altered")):
        read_state_dict(path)
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors({}, path, {"finetune_sha256": "0"})


def test_a_torchscript_file_given_as_weights_is_refused_without_torchs_advice(tmp_path):
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UserError, match="a TorchScript archive: a program, not weights") as error:
        read_state_dict(path)
    assert str(path) in str(error.value) and ADVICE not in str(error.value)
