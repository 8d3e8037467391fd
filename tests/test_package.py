"""The public Python API: every exported name resolves, and importing the package is cheap."""

from __future__ import annotations

import subprocess
import sys

import finetune
from tests.conftest import REPO


def test_every_exported_name_resolves():
    missing = [name for name in finetune.__all__ if getattr(finetune, name, None) is None]
    assert missing == []


def test_importing_the_package_does_not_import_torch():
    code = "import sys, finetune; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_no_exported_name_is_shadowed_by_a_submodule():
    """Importing a submodule sets it as an attribute of the package: a public function with a
    submodule's name would turn into that module (``finetune.freeze`` once did)."""
    import importlib
    import pkgutil

    before = {name: type(getattr(finetune, name)) for name in finetune.__all__}
    for module in pkgutil.walk_packages(finetune.__path__, "finetune."):
        if module.name != "finetune.__main__":
            importlib.import_module(module.name)
    after = {name: type(getattr(finetune, name)) for name in finetune.__all__}
    assert after == before
