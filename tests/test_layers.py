"""The tiers of DESIGN.md, checked on every import of the package (function-local and TYPE_CHECKING
ones included), and the rules that go with them.

Tiers, each importing only the ones below it (a tier may import itself):

    cli > shell | tui | lab > core.commands > core.migration > core.monitor > core.hosts
        > config > core.values > errors

``shell``, ``tui`` and ``lab`` stand side by side and import none of each other. ``config`` sits
above ``core.values`` because the inventory is parsed into its typed values (addresses, rates).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "kvmshell"
UI = ("textual", "prompt_toolkit", "rich")

# (module prefix, tier, group): the longest matching prefix decides
TIERS: list[tuple[str, int, str]] = [
    ("kvmshell", 0, "errors"),                 # the package itself: its version only
    ("kvmshell.errors", 0, "errors"),
    ("kvmshell.core", 1, "values"),            # the package docstring only
    ("kvmshell.core.values", 1, "values"),
    ("kvmshell.config", 2, "config"),
    ("kvmshell.logsetup", 2, "config"),
    ("kvmshell.core.hosts", 3, "hosts"),
    ("kvmshell.core.monitor", 4, "monitor"),
    ("kvmshell.core.migration", 5, "migration"),
    ("kvmshell.core.commands", 6, "commands"),
    ("kvmshell.shell", 7, "shell"),
    ("kvmshell.tui", 7, "tui"),
    ("kvmshell.lab", 7, "lab"),
    ("kvmshell.cli", 8, "cli"),
    ("kvmshell.__main__", 8, "cli"),
]

# `kvmshell.*` imports inside a function of core/ hide a cycle; the one factory that picks a monitor
# implementation by protocol is the exception the rules allow.
FACTORY = ("kvmshell.core.monitor.base", "make_monitor")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def tier_of(module: str) -> tuple[int, str]:
    best = max((p for p in TIERS if module == p[0] or module.startswith(p[0] + ".")), key=lambda p: len(p[0]))
    return best[1], best[2]


def package_modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PKG.rglob("*.py")):
        yield module_name(path), path, ast.parse(path.read_text(), str(path))


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    """The kvmshell modules an import statement names (``from X import y`` counts y when X.y is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_pkg else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    names = [base]
    for a in node.names:
        candidate = f"{base}.{a.name}"
        if (PKG.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                (PKG.parent / Path(*candidate.split(".")) / "__init__.py").exists():
            names.append(candidate)
    return names


def all_imports() -> Iterator[tuple[str, str, bool, str | None]]:
    """(importer, imported, inside a function, the function's name) for every kvmshell import."""
    for module, path, tree in package_modules():
        is_pkg = path.name == "__init__.py"

        def walk(node: ast.AST, func: str | None) -> Iterator[tuple[str, str, bool, str | None]]:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for name in imported_names(child, module, is_pkg):
                        if name == "kvmshell" or name.startswith("kvmshell."):
                            yield module, name, func is not None, func
                inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
                yield from walk(child, inner)

        yield from walk(tree, None)


def test_the_tiers_import_downwards_only() -> None:
    found: set[tuple[str, str]] = set()
    for importer, imported, _, _ in all_imports():
        (t_from, g_from), (t_to, g_to) = tier_of(importer), tier_of(imported)
        if g_from == g_to or t_to < t_from:
            continue
        found.add((importer, imported))
    assert not found, "imports against the tiers:\n" + "\n".join(f"  {a} -> {b}" for a, b in sorted(found))


def test_no_import_hides_inside_a_function_in_core() -> None:
    found: set[tuple[str, str]] = set()
    for importer, imported, local, func in all_imports():
        if local and importer.startswith("kvmshell.core.") and (importer, func) != FACTORY:
            found.add((importer, imported))
    assert not found, "function-local imports in core/:\n" + "\n".join(f"  {a} -> {b}" for a, b in sorted(found))


def test_the_migration_model_is_pure() -> None:
    """core/migration/model: pure functions over samples, no monitor, host or engine below it."""
    for importer, imported, _, _ in all_imports():
        if importer.startswith("kvmshell.core.migration.model"):
            assert imported.startswith(("kvmshell.core.migration.model", "kvmshell.core.values",
                                        "kvmshell.errors")), f"{importer} imports {imported}"


def test_the_tier_map_covers_every_module() -> None:
    for module, _, _ in package_modules():
        tier, group = tier_of(module)
        if module not in ("kvmshell", "kvmshell.core"):
            assert group != "errors" or module == "kvmshell.errors", f"{module} has no tier"


def test_core_imports_no_ui_library() -> None:
    code = ("import sys, kvmshell.core.monitor.fleet, kvmshell.core.monitor.qmp, kvmshell.core.monitor.hmp, "
            "kvmshell.core.commands.session, kvmshell.config, kvmshell.lab.launcher, kvmshell.cli; "
            f"print([m for m in sys.modules if m.split('.')[0] in {UI!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def third_party(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_one_importer_per_library() -> None:
    for module, _, tree in package_modules():
        mods = third_party(tree)
        if "qemu" in mods:
            assert module == "kvmshell.core.monitor.qmp", f"{module} imports qemu.qmp"
        if "asyncssh" in mods:
            assert module.startswith("kvmshell.core.hosts.ssh."), f"{module} imports asyncssh"
        if module.startswith("kvmshell.core"):
            assert not mods & set(UI), f"{module} imports a UI library"


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 60 and re.search(r"\bimport", doc), f"{init.relative_to(PKG.parent)}: no docstring " \
            "saying what the package owns and what it may import"


# -- size -----------------------------------------------------------------------------------------

MAX_LINES = 600              # of a module
MAX_ATTRIBUTES = 15          # distinct `self.X = ...` of a class in its methods other than __init__


def attributes_set_outside_init(cls: ast.ClassDef) -> set[str]:
    """The attributes a class's methods other than ``__init__`` assign on ``self`` (nested classes aside)."""
    found: set[str] = set()
    for method in cls.body:
        if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) or method.name == "__init__":
            continue
        for node in ast.walk(method):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for target in targets:
                for e in ast.walk(target):
                    if isinstance(e, ast.Attribute) and isinstance(e.ctx, ast.Store) and \
                            isinstance(e.value, ast.Name) and e.value.id == "self":
                        found.add(e.attr)
    return found


def too_large() -> dict[str, int]:
    """Every module over MAX_LINES and class over MAX_ATTRIBUTES, with its count."""
    found: dict[str, int] = {}
    for _, path, tree in package_modules():
        rel = path.relative_to(PKG).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found[rel] = lines
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                n = len(attributes_set_outside_init(node))
                if n > MAX_ATTRIBUTES:
                    found[f"{rel}:{node.name}"] = n
    return found


def test_no_module_or_class_grows_too_large() -> None:
    found = too_large()
    assert not found, (f"over {MAX_LINES} lines, or more than {MAX_ATTRIBUTES} attributes set outside __init__ "
                       "(split it: a frozen plan, a helper object):\n" + "\n".join(f"  {k}: {found[k]}" for k in sorted(found)))


def test_the_size_check_sees_what_it_should() -> None:
    cls = ast.parse("class C:\n"
                    "    def __init__(self):\n        self.a = 1\n"
                    "    def m(self):\n        self.b = self.c = 2\n        self.d: int = 3\n"
                    "        self.e += 1\n        self.b = 4\n        x.f = 5\n        self.g[0] = 6\n"
                    "        (self.h, y) = 7, 8\n").body[0]
    assert isinstance(cls, ast.ClassDef)
    assert attributes_set_outside_init(cls) == {"b", "c", "d", "e", "h"}

# -- only core/monitor knows QMP from HMP ---------------------------------------------------------

# Outside core/monitor nothing chooses by protocol (a comparison with Protocol.QMP/HMP, is_qmp( or an
# execute("query-...") literal), except comparisons about an address or how QEMU is started, not about talking to a monitor: they stay.
ADDRESS_LEVEL: set[tuple[str, str, str]] = {
    ("kvmshell.core.values.address", "parse_address", "Protocol.HMP"),      # a pty carries HMP only
    ("kvmshell.lab.launcher", "Lab.monitor_listener", "Protocol.QMP"),      # -chardev mode=control|readline
}


def protocol_choices(modules: Iterable[tuple[str, ast.Module]]) -> Iterator[tuple[str, str, str]]:
    """(module, function, what) for every protocol choice in ``modules`` outside core/monitor."""
    for module, tree in modules:
        if module.startswith("kvmshell.core.monitor"):
            continue

        def walk(node: ast.AST, scope: str) -> Iterator[tuple[str, str, str]]:
            for child in ast.iter_child_nodes(node):
                inner = scope
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner = f"{scope}.{child.name}" if scope else child.name
                    if isinstance(child, ast.ClassDef):
                        yield from walk(child, inner)
                        continue
                if isinstance(child, ast.Compare):
                    for side in (child.left, *child.comparators):
                        if isinstance(side, ast.Attribute) and isinstance(side.value, ast.Name) and \
                                side.value.id == "Protocol" and side.attr in ("QMP", "HMP"):
                            yield module, scope, f"Protocol.{side.attr}"
                elif isinstance(child, ast.Call):
                    func = child.func
                    if isinstance(func, ast.Name) and func.id == "is_qmp" or \
                            isinstance(func, ast.Attribute) and func.attr == "is_qmp":
                        yield module, scope, "is_qmp("
                    elif isinstance(func, ast.Attribute) and func.attr == "execute" and child.args and \
                            isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str) and \
                            child.args[0].value.startswith("query-"):
                        yield module, scope, f'execute("{child.args[0].value}")'
                yield from walk(child, inner)

        yield from walk(tree, "")


def test_only_core_monitor_chooses_between_qmp_and_hmp() -> None:
    found = set(protocol_choices((module, tree) for module, _, tree in package_modules()))
    new = sorted(found - ADDRESS_LEVEL)
    assert not new, "QMP/HMP chosen outside core/monitor (add a typed query or action to Monitor):\n" + \
        "\n".join(f"  {m} {f}: {w}" for m, f, w in new)
    gone = sorted(ADDRESS_LEVEL - found)
    assert not gone, "take these off ADDRESS_LEVEL, they are gone:\n" + \
        "\n".join(f"  {m} {f}: {w}" for m, f, w in gone)


def test_the_disk_copy_sends_no_raw_qmp() -> None:
    """The disk copy (migrate --copy-storage) speaks only through Monitor's typed block queries and actions."""
    path = PKG / "core" / "migration" / "live" / "storage.py"
    raw = [f"line {n.lineno}" for n in ast.walk(ast.parse(path.read_text()))
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "execute"]
    assert not raw, f"{path.name} calls execute(): " + ", ".join(raw)


def test_the_protocol_check_sees_what_it_should() -> None:
    """The walk finds each kind of choice (else an empty result would prove nothing)."""
    code = ('from kvmshell.core.values.address import Protocol\n'
            'class A:\n'
            '    async def f(self, mon):\n'
            '        if mon.protocol is Protocol.QMP or is_qmp(mon):\n'
            '            await mon.execute("query-status")\n'
            '        await mon.execute(command)\n')
    seen = sorted(protocol_choices([("kvmshell.core.commands.fake", ast.parse(code)),
                                    ("kvmshell.core.monitor.fake", ast.parse(code))]))
    assert seen == [("kvmshell.core.commands.fake", "A.f", "Protocol.QMP"),
                    ("kvmshell.core.commands.fake", "A.f", "execute(\"query-status\")"),
                    ("kvmshell.core.commands.fake", "A.f", "is_qmp(")]
