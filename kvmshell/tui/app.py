"""Placeholder: the dashboard is being built (see the TUI issue)."""

from __future__ import annotations

from kvmshell.core.session import Session


async def run_tui(session: Session, hint: str | None = None) -> int:
    """Run the dashboard over ``session`` until the user quits; the exit status."""
    raise NotImplementedError("the dashboard is not built yet")
