"""Partial loading: file formats, nested checkpoints, key rules in order, the report, bad files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from finetune.errors import UserError
from finetune.model import build_model
from finetune.run_folder import RunFolder
from finetune.weights import load_partial, read_state_dict, write_safetensors
from tests.conftest import invoke_cli, tiny_recipe, write_recipe


def _tiny(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def _assert_same_tensors(model: nn.Module, state: dict[str, torch.Tensor], keys: list[str]) -> None:
    target = model.state_dict()
    for key in keys:
        assert torch.equal(target[key], state[key]), key


# ------------------------------------------------------------------ torchvision -> timm resnet50
@pytest.fixture(scope="module")
def torchvision_resnet50(tmp_path_factory) -> tuple[nn.Module, Path]:
    """torchvision's resnet50 (random weights) and its state_dict saved as a .pth, built once."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "resnet50_torchvision.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_resnet50_checkpoint_loads_into_timm_resnet50(torchvision_resnet50):
    tv_model, path = torchvision_resnet50
    built = build_model(backbone="resnet50", num_classes=5, pretrained=path)
    report = built.load_report
    assert report.missing == ["fc.bias", "fc.weight"]  # zero missing backbone tensors
    assert report.unexpected == [] and report.excluded == []
    assert report.mismatched == [
        {"key": "fc.bias", "file_shape": [1000], "model_shape": [5]},
        {"key": "fc.weight", "file_shape": [1000, 2048], "model_shape": [5, 2048]},
    ]
    assert len(report.loaded) == len(tv_model.state_dict()) - 2
    assert report.warning is None
    # The same weights compute the same pooled features in both libraries.
    model = built.model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(nn.Sequential(*list(tv_model.children())[:-1])(images), 1)
        actual = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(actual, expected)


# --------------------------------------------------------------------------- sources and nesting
def test_dataparallel_prefix_is_stripped_and_noted(tmp_path):
    source = nn.DataParallel(_tiny(seed=1))
    assert next(iter(source.state_dict())).startswith("module.")
    torch.save(source.state_dict(), tmp_path / "dp.pth")
    model = _tiny()
    report = load_partial(model, tmp_path / "dp.pth")
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert any("'module.'" in note for note in report.notes)
    _assert_same_tensors(model, source.module.state_dict(), report.loaded)


def test_dataparallel_prefix_with_an_explicit_rule(tmp_path):
    source = nn.DataParallel(_tiny(seed=1))
    save_file(source.state_dict(), tmp_path / "dp.safetensors")
    report = load_partial(_tiny(), tmp_path / "dp.safetensors", strip_prefix=["module."])
    assert report.missing == [] and report.counts["loaded"] == len(source.state_dict())


@pytest.mark.parametrize("entry", ["state_dict", "model", "module", "ema"])
def test_checkpoint_nested_under_a_known_entry(tmp_path, entry):
    state = _tiny(seed=1).state_dict()
    torch.save({entry: state, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    model = _tiny()
    report = load_partial(model, tmp_path / "ckpt.pth")
    assert report.missing == []
    assert report.notes[0] == f"read the checkpoint's {entry!r} entry"
    _assert_same_tensors(model, state, list(state))


def test_key_picks_the_ema_weights(tmp_path):
    plain, ema = _tiny(seed=1).state_dict(), _tiny(seed=2).state_dict()
    torch.save({"state_dict": plain, "state_dict_ema": ema}, tmp_path / "ckpt.pth")
    assert torch.equal(read_state_dict(tmp_path / "ckpt.pth")["fc.weight"], plain["fc.weight"])
    model = _tiny()
    load_partial(model, tmp_path / "ckpt.pth", key="state_dict_ema")
    _assert_same_tensors(model, ema, list(ema))
    with pytest.raises(UserError, match="no entry 'ema_typo'"):
        load_partial(model, tmp_path / "ckpt.pth", key="ema_typo")


def test_checkpoint_with_argparse_options_loads(tmp_path):
    """torchvision's reference scripts save their argparse options beside the weights."""
    state = _tiny(seed=1).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ref.pth")
    assert load_partial(_tiny(), tmp_path / "ref.pth").missing == []


def test_run_folder_of_ours_with_another_head(tmp_path):
    source = _tiny(num_classes=7, seed=1)
    state = {"epoch": 1, "step": 0, "history": []}
    RunFolder(tmp_path / "run").commit_checkpoint(source, state, best=True)
    built = build_model(backbone="test_resnet", num_classes=3, pretrained=tmp_path / "run")
    report = built.load_report
    assert report.source == str(tmp_path / "run" / "best" / "model.safetensors")
    assert report.missing == ["fc.bias", "fc.weight"]
    assert {m["key"] for m in report.mismatched} == {"fc.weight", "fc.bias"}


# ------------------------------------------------------------------------------------ key rules
def test_rules_apply_in_order(tmp_path):
    """strip_prefix, then add_prefix, then rename, then include/exclude on the final key."""
    state = _tiny(seed=1).state_dict()
    file_state = {
        f"net.encoder.{key.replace('layer', 'stage')}": value for key, value in state.items()
    }
    model = _tiny()
    report = load_partial(
        model,
        file_state,
        strip_prefix=["net.", "encoder."],
        add_prefix="x.",
        rename={r"^x\.": "", r"stage(\d)": r"layer\1"},
        include=["layer*", "conv1.*", "bn1.*", "fc.*"],
        exclude=["fc.*"],
    )
    assert report.excluded == ["fc.bias", "fc.weight"]
    assert report.missing == ["fc.bias", "fc.weight"] and report.unexpected == []
    _assert_same_tensors(model, state, report.loaded)


def test_unexpected_keys_and_unmatched_patterns_are_reported():
    state = {**_tiny(seed=1).state_dict(), "aux_head.weight": torch.zeros(3)}
    report = load_partial(_tiny(), state, exclude=["nothing.*"])
    assert report.unexpected == ["aux_head.weight"]
    assert "exclude pattern 'nothing.*' matched no key of the file" in report.notes


def test_two_keys_renamed_to_one_is_an_error():
    state = _tiny().state_dict()
    with pytest.raises(UserError, match="two file keys become"):
        load_partial(
            _tiny(),
            {**state, **{f"module.{k}": v for k, v in state.items()}},
            strip_prefix=["module."],
        )


def test_bad_rename_regex_is_an_error():
    with pytest.raises(UserError, match="model.load.rename: '\\(' is not a regular expression"):
        load_partial(_tiny(), _tiny().state_dict(), rename={"(": ""})


# -------------------------------------------------------------------------- mismatch and strict
def test_head_shape_mismatch_is_skipped_and_reported():
    source = _tiny(num_classes=10, seed=1)
    model = _tiny(num_classes=3)
    head_before = model.fc.weight.clone()
    report = load_partial(model, source.state_dict())
    assert report.mismatched == [
        {"key": "fc.bias", "file_shape": [10], "model_shape": [3]},
        {"key": "fc.weight", "file_shape": [10, 96], "model_shape": [3, 96]},
    ]
    assert report.counts == {
        "loaded": len(source.state_dict()) - 2,
        "missing": 2,
        "unexpected": 0,
        "mismatched": 2,
        "excluded": 0,
    }
    assert torch.equal(model.fc.weight, head_before)
    _assert_same_tensors(model, source.state_dict(), report.loaded)
    assert report.to_dict()["mismatched"][1]["file_shape"] == [10, 96]


def test_shape_mismatch_error_names_both_shapes_and_loads_nothing():
    model = _tiny(num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as caught:
        load_partial(model, _tiny(num_classes=10, seed=1).state_dict(), on_shape_mismatch="error")
    assert "fc.weight: file [10, 96] vs model [3, 96]" in str(caught.value)
    _assert_same_tensors(model, before, list(before))


def test_strict_allows_only_the_new_head_to_stay_unloaded():
    state = _tiny(num_classes=10, seed=1).state_dict()
    report = load_partial(_tiny(), state, strict=True, new_head=["fc.*"])
    assert report.missing == ["fc.bias", "fc.weight"]
    with pytest.raises(UserError, match="left 1 of the model's tensors unloaded") as caught:
        load_partial(_tiny(), state, strict=True, new_head=["fc.*"], exclude=["conv1.0.*"])
    assert "conv1.0.weight" in str(caught.value)


# ---------------------------------------------------------------------- nothing matches: loudly
def test_nothing_matching_suggests_the_prefix_to_strip():
    state = {f"backbone.{key}": value for key, value in _tiny(seed=1).state_dict().items()}
    report = load_partial(_tiny(), state)
    assert report.loaded == [] and report.almost_nothing_loaded
    assert "strip_prefix: [backbone.]" in report.suggestion
    assert "only 0 of the model's" in report.warning and "backbone." in report.warning


def test_nothing_matching_suggests_a_prefix_to_add():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny()

    report = load_partial(Wrapper(), _tiny(seed=1).state_dict())
    assert "add_prefix: model." in report.suggestion


def _fastai_learner_file() -> dict[str, torch.Tensor]:
    """What fastai's ``Learner.save`` holds for a vision learner: the body as ``0.model.*``
    (timm models are wrapped as ``TimmBody.model``) and fastai's own head as ``1.*``."""
    body = {f"0.model.{key}": value for key, value in _tiny(seed=1).state_dict().items()}
    head = {"1.2.weight": torch.ones(192), "1.4.weight": torch.ones(3, 192)}
    return {
        key: value for key, value in {**body, **head}.items() if not key.startswith("0.model.fc.")
    }


def test_a_fastai_file_gets_the_multi_part_prefix_that_loads_every_backbone_tensor():
    state = _fastai_learner_file()
    report = load_partial(_tiny(), state, new_head=["fc.*"])
    backbone = len(state) - 2
    assert report.suggestion == (
        f"model.load: {{strip_prefix: [0.model.]}} would load {backbone} of the file's "
        f"{len(state)} tensors (as it is: 0)"
    )
    followed = load_partial(_tiny(), state, strip_prefix=["0.model."], new_head=["fc.*"])
    assert len(followed.loaded) == backbone and followed.missing == ["fc.bias", "fc.weight"]


def test_a_strict_load_that_fails_names_the_rule_and_counts_what_the_list_leaves_out():
    state = _fastai_learner_file()
    with pytest.raises(UserError) as caught:
        load_partial(_tiny(), state, strict=True, new_head=["fc.*"])
    message = str(caught.value)
    unloaded = len(_tiny().state_dict()) - 2
    assert f"left {unloaded} of the model's tensors unloaded" in message
    assert "{strip_prefix: [0.model.]} would load" in message
    assert caught.value.problems[-1] == f"... and {unloaded - 20} more"
    assert len(caught.value.problems) == 21


def test_a_prefix_to_strip_and_one_to_add_are_suggested_together():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _tiny()

    state = {f"encoder.{key}": value for key, value in _tiny(seed=1).state_dict().items()}
    report = load_partial(Wrapper(), state)
    assert "{strip_prefix: [encoder.], add_prefix: backbone.} would load" in report.suggestion


def test_a_module_used_in_two_places_is_written_and_loads_back(tmp_path):
    """Its parameters appear under both names, sharing memory, which safetensors refuses as is."""
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    write_safetensors(model.state_dict(), tmp_path / "tied.safetensors")
    fresh = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    fresh.append(fresh[0])
    report = load_partial(fresh, tmp_path / "tied.safetensors")
    assert report.loaded == ["0.bias", "0.weight", "2.bias", "2.weight"]
    torch.testing.assert_close(fresh[0].weight, shared.weight)


def test_unrelated_keys_show_examples_of_both_sides():
    report = load_partial(_tiny(), {"encoder.stem.kernel": torch.zeros(1)})
    assert "file keys look like 'encoder.stem.kernel'" in report.suggestion


# ------------------------------------------------------------------------------------ bad files
class _RunsCode:
    """Unpickling this would run a shell command: weights_only=True must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save(_tiny().state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    save_file(_tiny().state_dict(), tmp_path / "good.safetensors")
    truncated_st = tmp_path / "truncated.safetensors"
    truncated_st.write_bytes((tmp_path / "good.safetensors").read_bytes()[:1000])
    code = tmp_path / "code.pth"
    torch.save({"state_dict": _tiny().state_dict(), "x": _RunsCode(tmp_path / "pwned")}, code)
    return {"truncated": truncated, "truncated_st": truncated_st, "code": code}


def test_bad_files_are_refused_with_a_clear_message(tmp_path):
    files = _bad_files(tmp_path)
    model = _tiny()
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_partial(model, files["truncated"])
    with pytest.raises(UserError, match="not a readable safetensors file, truncated or corrupt"):
        load_partial(model, files["truncated_st"])
    with pytest.raises(UserError, match="refused to load: unpickling it would run code"):
        load_partial(model, files["code"])
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UserError, match="weights file not found"):
        load_partial(model, tmp_path / "missing.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(UserError, match="unknown weights format"):
        load_partial(model, tmp_path / "w.npz")


@pytest.mark.parametrize("kind", ["missing", "truncated", "code"])
def test_bad_checkpoint_exits_2_from_the_cli(tmp_path, kind):
    path = tmp_path / "missing.pth" if kind == "missing" else _bad_files(tmp_path)[kind]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(model={"backbone": "test_resnet", "num_classes": 3, "pretrained": str(path)}),
    )
    result = invoke_cli("plan", str(recipe))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "Traceback" not in result.stderr
    expected = {
        "missing": "model.pretrained: path does not exist",
        "truncated": "truncated or corrupt",
        "code": "refused to load",
    }[kind]
    assert expected in result.stderr
    assert not (tmp_path / "pwned").exists()
