"""BatchNorm fusion and export: folds checked against torch.fx and by counting aten batch_norm
calls, fused logits against the originals', and `finetune export` end to end in subprocesses."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.config.train import EXPORT_FORMATS
from finetune.errors import UserError
from finetune.export import compare_logits, export_run, parse_formats
from finetune.fusion import fuse_bn, fuse_bn_with_report
from finetune.inference import FILES, load_exported, load_trained, predict_images
from tests.conftest import invoke_cli, tiny_recipe, write_recipe

TOLERANCE = 1e-4
HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


# --------------------------------------------------------------------------------- references
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so that folding is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


class BatchNormCalls(TorchDispatchMode):
    """Counts the aten batch_norm kernels one forward pass runs (whatever module calls them)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "batch_norm" in func.name()
        return func(*args, **(kwargs or {}))


def batchnorm_calls(model: nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad(), BatchNormCalls() as counter:
        model(images)
    return counter.count


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, (_ConvNd, nn.Linear, _BatchNorm)) or super().is_leaf_module(
            module, name
        )


def fx_foldable(model: nn.Module) -> set[str] | None:
    """The reference: BatchNorms whose fx-graph input is a conv/linear node with no other user;
    None when torch.fx cannot trace the model."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "no reference"
        return None
    modules = dict(model.named_modules())
    foldable = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _BatchNorm):
            source = node.args[0]
            if (
                isinstance(source, torch.fx.Node)
                and source.op == "call_module"
                and isinstance(modules[source.target], (_ConvNd, nn.Linear))
                and len(source.users) == 1
            ):
                foldable.add(node.target)
    return foldable


class Branchy(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) around every folding rule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pre_bn, self.pre_conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.res_conv, self.res_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.trap_conv, self.trap_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.up, self.up_bn = nn.ConvTranspose2d(8, 4, 2, stride=2), BatchNormAct2d(4)
        self.conv1d, self.bn1d = nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.fc, self.fc_bn = nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(x))  # folds
        if x.abs().sum() > 0:  # fx cannot trace this branch
            x = self.pre_conv(torch.relu(self.pre_bn(x)))  # pre-activation: pre_bn stays
        y = self.res_conv(x)
        x = self.res_bn(y) + y  # y used twice: res_bn stays
        t = self.trap_conv(x)
        t.relu_()  # in place, between conv and BN
        x = self.trap_bn(t)  # so trap_bn stays
        x = self.up_bn(self.up(x))  # transposed conv + BN-act folds
        x = self.bn1d(self.conv1d(x.flatten(2))).mean(-1)  # Conv1d + BatchNorm1d folds
        return self.head(self.fc_bn(self.fc(x)))  # Linear + BatchNorm1d folds


def build(name: str) -> nn.Module:
    if name == "branchy":
        return Branchy()
    if name.startswith("torchvision:"):
        return torchvision.models.get_model(name.split(":")[1], weights=None, num_classes=10)
    return timm.create_model(name, pretrained=False, num_classes=10)


# model, image size, BatchNorms expected to stay (densenet: the norm before each conv, the final
# norm; branchy: pre_bn, res_bn, trap_bn)
MODELS = [
    ("test_resnet", 32, 0),
    ("resnet18", 32, 0),
    ("test_efficientnet", 32, 0),
    ("mobilenetv3_small_050", 32, 0),
    ("regnetx_002", 32, 0),
    ("densenet121", 32, 62),
    ("test_convnext", 32, 0),
    ("test_vit", 160, 0),
    ("torchvision:resnet18", 32, 0),
    ("torchvision:mobilenet_v2", 32, 0),
    ("torchvision:vgg11_bn", 32, 0),
    ("branchy", 16, 3),
]


# ---------------------------------------------------------------------------------- fuse_bn
@pytest.mark.parametrize("name, size, remaining", MODELS, ids=[m[0] for m in MODELS])
def test_fuse_bn_folds_every_foldable_batchnorm_and_keeps_the_logits(name, size, remaining):
    model = randomize_batchnorm(build(name))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused, report = fuse_bn_with_report(model, example_input=images)

    with torch.no_grad():
        parity = compare_logits(model(images), fused(images))
    assert parity["max_rel_diff"] <= TOLERANCE and parity["top1_agreement"] == 1.0, parity
    calls_before, calls_after = batchnorm_calls(model, images), batchnorm_calls(fused, images)
    assert calls_before == len(report.folded) + len(report.remaining)
    assert calls_after == len(report.remaining) == remaining, report.remaining
    reference = fx_foldable(model)
    if reference is not None:
        assert {pair["bn"] for pair in report.folded} == reference
    assert report.params_after == sum(p.numel() for p in fused.parameters())
    if calls_before == 0:  # no BatchNorm (convnext, vit): a reported no-op
        assert report.folded == [] and report.params_after == report.params_before
        assert parity["max_abs_diff"] == 0


def test_fuse_bn_follows_tensors_where_fx_cannot_trace():
    model = randomize_batchnorm(Branchy())
    assert fx_foldable(model) is None
    _, report = fuse_bn_with_report(model, example_input=torch.randn(2, 3, 16, 16))
    assert {(p["bn"], p["into"]) for p in report.folded} == {
        ("stem_bn", "stem"),
        ("up_bn", "up"),
        ("bn1d", "conv1d"),
        ("fc_bn", "fc"),
    }
    reasons = {r["bn"]: r["reason"] for r in report.remaining}
    assert set(reasons) == {"pre_bn", "res_bn", "trap_bn"}
    assert "not the output" in reasons["pre_bn"] and "also used" in reasons["res_bn"]


def test_fuse_bn_copies_unless_inplace_and_keeps_batchnorm_act_activation():
    model = randomize_batchnorm(Branchy())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_bn(model, example_input=torch.randn(2, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.stem_bn, nn.BatchNorm2d) and isinstance(fused.stem_bn, nn.Identity)
    assert isinstance(fused.up_bn, nn.ReLU) and fused.stem.bias is not None
    same = fuse_bn(model, inplace=True, example_input=torch.randn(2, 3, 16, 16))
    assert same is model and isinstance(model.stem_bn, nn.Identity)


def test_fuse_bn_refuses_a_batchnorm_over_another_axis_than_the_layers_features():
    class Tokens(nn.Module):  # Linear over (N, L, C); BatchNorm1d(L) normalises L, not C
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x))

    model = randomize_batchnorm(Tokens())
    tokens = torch.randn(2, 6, 4)
    fused, report = fuse_bn_with_report(model, example_input=tokens)
    assert report.folded == [] and "features" in report.remaining[0]["reason"]
    with torch.no_grad():
        assert torch.equal(model(tokens), fused(tokens))


def test_onnx_format_without_the_onnx_package_is_bad_input(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match="pip install onnx"):
        parse_formats(["safetensors,onnx"])
    with pytest.raises(UserError, match="valid formats: safetensors, torchscript, onnx, pt2"):
        parse_formats(["tflite"])


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    recipe = tiny_recipe(model={"backbone": "test_resnet"}, train={"epochs": 1})
    result = invoke_cli(
        "run", str(write_recipe(root / "r.yaml", recipe)), "--run-dir", str(root / "run")
    )
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.fixture(scope="module")
def exported(trained_run) -> Path:
    out = trained_run.parent / "exported"
    formats = ["safetensors", "torchscript", "pt2"] + (["onnx"] if HAS_ONNX else [])
    result = invoke_cli(
        "export", str(trained_run), "--format", ",".join(formats), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_export_json_describes_the_fused_model_and_its_verification(trained_run, exported):
    info = json.loads((exported / "export.json").read_text())
    classes = json.loads((trained_run / "classes.json").read_text())
    assert info["backbone"] == "test_resnet" and info["fused"] is True
    assert info["classes"] == [classes[str(i)] for i in range(len(classes))]
    assert info["num_classes"] == 3 and info["input_size"] == [3, 32, 32]
    assert len(info["mean"]) == len(info["std"]) == 3
    assert info["source"] == str((trained_run / "best" / "model.safetensors").resolve())
    assert len(info["batchnorm"]["folded"]) == 15 and info["batchnorm"]["remaining"] == []
    assert info["parameters"]["after"] < info["parameters"]["before"]
    assert all((exported / name).is_file() for name in info["formats"].values())
    verification = info["verification"]
    assert verification["passed"] and verification["tolerance"] == TOLERANCE
    assert set(verification["results"]) == {"fused", *info["formats"]}
    for name, check in verification["results"].items():
        if "skipped" not in check:
            assert check["max_rel_diff"] <= TOLERANCE and check["top1_agreement"] == 1.0, name


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_every_exported_file_loads_back_and_matches(trained_run, exported):
    images = torch.randn(5, 3, 32, 32)  # another batch size than export's: the batch axis is free
    with torch.no_grad():
        reference = load_trained(trained_run, device="cpu").model(images)
        from_safetensors = load_exported(exported / "model.safetensors", device="cpu").model
        assert not any(isinstance(m, _BatchNorm) for m in from_safetensors.modules())
        outputs = {
            "safetensors": from_safetensors(images),
            "torchscript": torch.jit.load(exported / "model.torchscript.pt")(images),
            "pt2": torch.export.load(exported / "model.pt2").module()(images),
        }
    if HAS_ORT and HAS_ONNX:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(exported / "model.onnx"))
        outputs["onnx"] = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    for name, logits in outputs.items():
        assert compare_logits(reference, logits)["max_rel_diff"] <= TOLERANCE, name


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_predict_reads_an_export_folder(trained_run, exported, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), np.uint8)).save(image)
    result = invoke_cli("predict", str(exported), str(image), "--json")
    assert result.returncode == 0, result.stderr
    (from_export,) = json.loads(result.stdout)
    (from_run,) = predict_images(load_trained(trained_run, device="cpu"), [image])
    torchscript = load_trained(exported / "model.torchscript.pt", trust_code=True)  # a program
    (from_torchscript,) = predict_images(torchscript, [image])
    expected = {p["class"]: p["probability"] for p in from_run["top_k"]}
    for item in (from_export, from_torchscript):
        assert item["top_k"][0]["class"] == from_run["top_k"][0]["class"]
        assert {p["class"]: p["probability"] for p in item["top_k"]} == pytest.approx(
            expected, abs=1e-4
        )


@pytest.mark.skipif(not HAS_ONNX, reason="onnx is not installed")
def test_onnx_without_onnxruntime_is_written_and_noted(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = export_run(trained_run, out=tmp_path / "out", formats=["onnx"], fuse_bn=False)
    assert (
        "onnxruntime is not installed" in result.info["verification"]["results"]["onnx"]["skipped"]
    )
    assert (tmp_path / "out" / "model.onnx").is_file() and result.info["verification"]["passed"]
    assert result.info["fused"] is False and result.info["batchnorm"]["folded"] == []


def test_export_without_fusion_reports_every_batchnorm_as_remaining(trained_run, tmp_path):
    result = export_run(trained_run, out=tmp_path / "out", formats=["safetensors"], fuse_bn=False)
    batchnorm = result.info["batchnorm"]
    assert batchnorm["folded"] == [] and len(batchnorm["remaining"]) == 15
    assert {item["reason"] for item in batchnorm["remaining"]} == {"fuse_bn is off"}
    params = result.info["parameters"]
    assert params["before"] == params["after"]


def test_export_beyond_tolerance_exits_1_and_keeps_the_files_as_failed(trained_run, tmp_path):
    out = tmp_path / "out"
    result = invoke_cli(
        "export",
        str(trained_run),
        "--format",
        "safetensors",
        "--out",
        str(out),
        "--tolerance",
        "1e-30",
    )
    assert result.returncode == 1, result.stderr
    assert "verification failed" in result.stderr and "Traceback" not in result.stderr
    failed = tmp_path / "out.failed"
    assert not out.exists() and (failed / "model.safetensors").is_file()
    assert json.loads((failed / "export.json").read_text())["verification"]["passed"] is False


def test_the_recipes_export_section_sets_the_defaults(trained_run, tmp_path):
    assert tuple(FILES) == EXPORT_FORMATS  # a file name for every format a recipe may name
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True, ignore=shutil.ignore_patterns("export"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["export"] = {"fuse_bn": False, "formats": ["safetensors"], "tolerance": 1e-3}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    info = export_run(run, out=tmp_path / "from-recipe").info
    assert set(info["formats"]) == {"safetensors"} and info["fused"] is False
    assert info["verification"]["tolerance"] == 1e-3
    result = invoke_cli(
        "export",
        str(run),
        "--fuse-bn",
        "--format",
        "pt2",
        "--tolerance",
        "1e-5",
        "--out",
        str(tmp_path / "from-options"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info["formats"]) == {"pt2"} and info["fused"] is True
    assert info["verification"]["tolerance"] == 1e-5


def test_an_unknown_format_in_the_recipe_is_refused_by_key(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(export={"formats": ["tflite"]}))
    result = invoke_cli("validate", str(path))
    assert result.returncode == 2 and "export.formats" in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["no checkpoint", "unknown format", "unwritable out"])
def test_bad_input_exits_2_with_a_clear_message(trained_run, tmp_path, case):
    source, extra, expected = trained_run, [], ""
    if case == "no checkpoint":
        source = tmp_path / "empty-run"
        source.mkdir()
        for name in ("recipe.yaml", "classes.json"):
            shutil.copy(trained_run / name, source / name)
        expected = "without model.safetensors"
    elif case == "unknown format":
        extra, expected = ["--format", "tflite"], "valid formats: safetensors, torchscript"
    else:
        (tmp_path / "a-file").write_text("")
        extra, expected = ["--out", str(tmp_path / "a-file" / "out")], "--out: cannot write"
    result = invoke_cli("export", str(source), *extra)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
