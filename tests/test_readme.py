"""The README's promises: its two commands are what CI runs, and what it names exists."""

from __future__ import annotations

import re

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
