"""The command language: one registry of specs, read by every face."""

from __future__ import annotations

from kvmshell.core.commands.spec import Registry


def default_registry() -> Registry:
    from kvmshell.core.commands import builtin, control, migration, snapshots, static
    return Registry([*snapshots.SPECS, *migration.SPECS, *static.SPECS, *control.SPECS, *builtin.SPECS])
