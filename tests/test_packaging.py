"""What a user gets from a plain `pip install`: a wheel with every data file, every imported library
declared, `python -m kvmshell`. The wheel is installed into a fresh venv outside the tree."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared() -> set[str]:
    """The dependencies, and the extras kvmshell imports lazily (libvirt)."""
    names = set()
    for req in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["libvirt"]:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.lower().replace("_", "-").replace(".", "-"))
    return names


def imported_libraries() -> set[str]:
    mods: set[str] = set()
    for path in (ROOT / "kvmshell").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "kvmshell"}


def test_every_imported_library_is_declared() -> None:
    dists = packages_distributions()
    needed = {d.lower().replace("_", "-").replace(".", "-") for m in imported_libraries() for d in dists.get(m, [m])}
    assert needed, "the walk found no library"
    assert needed <= declared(), f"imported but not declared in pyproject.toml: {sorted(needed - declared())}"


@pytest.mark.timeout(300)
def test_the_wheel_works_from_a_fresh_venv_outside_the_tree(tmp_path: Path) -> None:
    """`pip wheel .` then `pip install` it elsewhere, as pipx would: the version, `python -m kvmshell`,
    and the dashboard started headless (it reads its stylesheet from the installed package). The
    libraries come from the project's venv (offline), kvmshell itself only from the wheel."""
    src = tmp_path / "src"                  # the tracked files only: no egg-info left by an editable install
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=30).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=240)
    [wheel] = wheels.glob("kvmshell-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # the dependencies: the project venv's site-packages as a plain path (its .pth files, among them the
    # editable install of the tree, are not read from there)
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state")}
    run = lambda *argv: subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,  # noqa: E731
                                       env=env)
    version = run(str(venv / "bin" / "kvmshell"), "--version")
    assert version.returncode == 0 and PROJECT["version"] in version.stdout, version
    module = run(str(venv / "bin" / "python"), "-m", "kvmshell", "--version")
    assert module.returncode == 0 and module.stdout == version.stdout, module
    headless = run(str(venv / "bin" / "python"), "-c", HEADLESS)
    assert headless.returncode == 0, headless.stderr[-2000:]
    where, shown = headless.stdout.splitlines()
    assert where.startswith(str(site)), f"kvmshell came from {where}, not from the wheel"
    assert shown == "dashboard shown"


HEADLESS = """
import asyncio
import kvmshell
from kvmshell.config import Config
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.tui.app import KvmshellApp
from kvmshell.tui.source import SessionSource

async def main():
    async with Fleet() as fleet:
        session = Session(fleet, default_registry(), Config())
        app = KvmshellApp(SessionSource(session))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert app.dashboard is not None
        await session.aclose()
    print(kvmshell.__file__)
    print("dashboard shown")

asyncio.run(main())
"""
