"""The layering rules of DESIGN.md, checked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "kvmshell"
UI = ("textual", "prompt_toolkit", "rich")


def test_core_imports_no_ui_library() -> None:
    code = ("import sys, kvmshell.core.fleet, kvmshell.core.qmp, kvmshell.core.hmp, kvmshell.config, "
            "kvmshell.lab.launcher, kvmshell.cli; "
            f"print([m for m in sys.modules if m.split('.')[0] in {UI!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_one_importer_per_library() -> None:
    for path in PKG.rglob("*.py"):
        mods = imports(path)
        rel = path.relative_to(PKG).as_posix()
        if any(m.split(".")[0] == "qemu" for m in mods):
            assert rel == "core/qmp.py", f"{rel} imports qemu.qmp"
        if any(m.split(".")[0] == "asyncssh" for m in mods):
            assert rel == "core/transport.py", f"{rel} imports asyncssh"
        if rel.startswith("core/"):
            assert not any(m.split(".")[0] in UI for m in mods), f"{rel} imports a UI library"
