"""The README's promises: its two commands are what CI runs, and what it names exists."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    install_and_quickstart, tests = (block.strip() for block in _bash_blocks()[:2])
    ci = (REPO / ".ci" / "run").read_text()
    install = install_and_quickstart.split(" && . .venv/bin/activate")[0]
    assert install in ci
    assert tests in ci.splitlines()


def test_quickstart_recipes_exist():
    install_and_quickstart = _bash_blocks()[0]
    recipes = re.findall(r"finetune run (\S+)", install_and_quickstart)
    assert recipes and all((REPO / recipe).is_file() for recipe in recipes)


def test_every_shipped_recipe_opens_with_its_purpose_and_command():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# "), path
        assert f"finetune run recipes/{path.name}" in text, path


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    """The README's custom head, parameter-group rule and loop, run as written (on the CPU)."""
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    example = next(
        block
        for block in re.findall(r"```python\n(.*?)```", section, flags=re.S)
        if "register_head" in block
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example.replace('device="auto"', 'device="cpu"'), "README.md", "exec"), namespace)
    optimizer, state = namespace["optimizer"], namespace["state"]
    groups = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert groups["fc.*"] == pytest.approx(10 * groups["default"])  # the rule, after 2 epochs
    assert len(state.history) == 2 and 0 <= state.history[-1]["val/top1"] <= 1
    assert type(namespace["model"].fc).__name__ == "CosineHead"
