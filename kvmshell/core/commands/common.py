"""Helpers shared by the command handlers."""

from __future__ import annotations

from kvmshell.core.commands.session import Invocation
from kvmshell.errors import Refused


async def refuse_during_migration(inv: Invocation, what: str) -> None:
    info = await inv.monitor.migration()
    if info.status.is_active:
        raise Refused(f"{what} refused: a migration of this guest is {info.status} and {what} now would "
                      "pause it mid-migration; wait for it to finish or run migrate_cancel", guest=inv.guest)
