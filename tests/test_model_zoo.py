"""benchmarks/model_zoo.py's check on one tiny model per head kind: build, one training step,
fused and verified export, a prediction from the export.

The distilled kind (two heads) is left to the benchmark: deit_tiny_distilled_patch16_224 runs at
224 px and costs about 5 s of CPU here, over the budget of this file (tests/test_model.py checks
that both its heads are replaced).
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import load_benchmark

zoo = load_benchmark("model_zoo")


@pytest.mark.parametrize(
    ("name", "heads", "has_batchnorm"),
    [
        ("test_resnet", ("fc",), True),  # a linear classifier
        ("dla46_c", ("fc",), True),  # a 1x1-convolution classifier
        ("test_vit", ("head",), False),  # a token model, at its fixed input size
    ],
)
def test_a_model_of_each_head_kind_fits(tmp_path, name, heads, has_batchnorm):
    row = zoo.check_model(name, tmp_path)

    assert row.fits, row.trace
    assert row.heads == heads
    assert row.image_size == zoo.default_image_size(name)
    assert row.train_seconds > 0 and row.params > 0
    assert (row.folded > 0) == has_batchnorm and row.remaining == 0
    assert row.max_rel_diff <= 1e-4  # the export's own tolerance
    assert row.prediction.startswith("class_")
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "export" / "export.json").is_file()
    assert zoo.format_row(row).endswith("OK")


def test_a_failure_is_a_row_and_the_run_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["model_zoo.py", "--models", "no_such_model", "--threads", "1"]
    )

    with pytest.raises(SystemExit) as exit_info:
        zoo.main()

    assert exit_info.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "FAIL build: UserError: model.backbone: unknown model 'no_such_model'" in lines[1]
    assert lines[-1] == "0 of 1 fit"
