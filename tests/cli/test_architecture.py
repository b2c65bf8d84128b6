"""The layers of the house: lcmkit (the product) never imports lcmkit_world (its proving ground), which plugs in
through entry points; ``lcmkit --help`` lists the product's commands first; no source file is over 600 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PRODUCT, PROVING_GROUND = "lcmkit", "lcmkit_world"


def imported_modules(path: Path, src: Path = SRC) -> set[str]:
    """Absolute names of every module ``path`` (under ``src``) imports, and of every name it imports from one
    (``from a import b`` gives ``a`` and ``a.b``); relative imports resolved against its package."""
    package = path.relative_to(src).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((SRC / PRODUCT).rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_product_never_imports_the_proving_ground(path):
    bad = sorted(m for m in imported_modules(path) if m == PROVING_GROUND or m.startswith(PROVING_GROUND + "."))
    assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_the_check_sees_every_spelling_of_an_import(tmp_path):
    # the checker must catch each form, or the test above would pass on anything
    package = tmp_path / PRODUCT / "train"
    package.mkdir(parents=True)
    forms = {"import lcmkit_world.world": "lcmkit_world.world", "from lcmkit_world import demo": "lcmkit_world.demo",
             "    from lcmkit_world.evaluate.run import evaluate": "lcmkit_world.evaluate.run",
             "from ..commands import generate": "lcmkit.commands.generate"}
    for i, (line, module) in enumerate(forms.items()):
        path = package / f"m{i}.py"
        path.write_text(f"def f():\n{line}\n" if line.startswith(" ") else line + "\n")
        assert module in imported_modules(path, tmp_path), line


def test_importing_the_whole_product_loads_nothing_of_the_proving_ground():
    code = ("import importlib, pkgutil, sys, lcmkit\n"
            "for m in pkgutil.walk_packages(lcmkit.__path__, 'lcmkit.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'lcmkit_world'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_product_commands_first():
    from lcmkit.cli import COMMANDS, build_parser

    choices = list(build_parser()._subparsers._group_actions[0].choices)
    assert choices[:len(COMMANDS)] == COMMANDS
    assert {"world", "eval", "bench", "demo"} <= set(choices[len(COMMANDS):])


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_the_torch_free_names_are_the_librarys():
    import torch

    from lcmkit.flow_solvers import FLOW_SAMPLERS
    from lcmkit.options import (
        ALL_SAMPLER_NAMES,
        CONSISTENCY_SAMPLERS,
        DTYPE_NAMES,
        FLOW_SAMPLER_NAMES,
        SAMPLER_NAMES,
        TEACHER_SAMPLERS,
    )
    from lcmkit.pipelines import DTYPES
    from lcmkit.solvers import SAMPLERS

    assert tuple(SAMPLERS) == CONSISTENCY_SAMPLERS and SAMPLER_NAMES == CONSISTENCY_SAMPLERS + TEACHER_SAMPLERS
    assert tuple(FLOW_SAMPLERS) == FLOW_SAMPLER_NAMES and set(ALL_SAMPLER_NAMES) == {*SAMPLER_NAMES, *FLOW_SAMPLERS}
    assert tuple(DTYPES) == DTYPE_NAMES and DTYPES["bfloat16"] is torch.bfloat16


def test_a_broken_extension_does_not_take_the_cli_down(monkeypatch, capsys):
    import importlib.metadata

    from lcmkit import cli

    class Broken:
        name, value = "broken", "nowhere:register"

        def load(self):
            raise ImportError("no module named nowhere")

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [Broken()] if kw.get("group") == cli.COMMAND_ENTRY_POINTS else real(**kw))
    choices = build_choices(cli)
    assert choices[:len(cli.COMMANDS)] == cli.COMMANDS
    assert "'broken' commands" in capsys.readouterr().err


def build_choices(cli) -> list[str]:
    return list(cli.build_parser()._subparsers._group_actions[0].choices)
