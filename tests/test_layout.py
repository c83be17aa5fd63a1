"""The layout a new engineer can rely on (docs/ARCHITECTURE.md): one import namespace, every
environment variable read in one module, small classes and functions.

A class over CLASS_MAX lines or a function over FUNC_MAX lines needs its reason written on a
``# long: ...`` comment directly above it (above its decorators, if any; the reason may
go on over further comment lines)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = ("pipespec_fast", "models", "csrc_triton")  # folders installed under pipespec_fast
CLASS_MAX = 150
FUNC_MAX = 60


def _sources() -> list[Path]:
    return sorted(p for d in INSTALLED for p in (ROOT / d).rglob("*.py"))


def _has_reason(lines: list[str], node: ast.AST) -> bool:
    """A comment block directly above the definition (or its decorators) that starts with
    ``# long: <reason>``."""
    i = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        if re.match(r"#\s*long:\s*\S", lines[i].strip()):
            return True
        i -= 1
    return False


def test_no_oversized_class_or_function_without_a_reason():
    too_long = []
    for path in _sources():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                limit = CLASS_MAX
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = FUNC_MAX
            else:
                continue
            n = node.end_lineno - node.lineno + 1
            if n > limit and not _has_reason(lines, node):
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not too_long, "over the size limits with no '# long:' reason:\n" + "\n".join(too_long)


def test_environment_read_in_one_module():
    readers = set()
    for path in _sources():
        if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text()):
            readers.add(str(path.relative_to(ROOT)))
    assert readers == {"pipespec_fast/config.py"}, sorted(readers)


@pytest.mark.parametrize("name", ["models", "csrc_triton", "tools", "bench"])
def test_only_pipespec_fast_is_importable_after_install(name, tmp_path):
    # run outside the checkout: a checkout on sys.path would make its folders importable
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named" in proc.stderr, proc.stderr


def test_the_namespace_holds_models_and_kernels(tmp_path):
    code = ("import pipespec_fast.models.llama, pipespec_fast.kernels.acceptance, "
            "pipespec_fast.models.defaults as d; print(d.DRAFT_DIR.is_dir())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
