"""The registry of every command kvmshell knows, built from the handler modules' specs."""

from __future__ import annotations

from kvmshell.core.commands import builtin, control, migration, snapshots, static
from kvmshell.core.commands.spec import Registry


def default_registry() -> Registry:
    return Registry([*snapshots.SPECS, *migration.SPECS, *static.SPECS, *control.SPECS, *builtin.SPECS])
