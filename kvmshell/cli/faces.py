"""The interactive faces: `kvmshell shell` and `kvmshell tui`."""

from __future__ import annotations

import argparse
from typing import TextIO

from kvmshell.cli.common import Exit
from kvmshell.cli.lines import close_session, open_session, say_unfollowed
from kvmshell.config import Config


async def cmd_shell(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    from kvmshell.config import state_dir
    from kvmshell.shell.app import Shell, history_file
    session = await open_session(args, config, err, interactive=True)
    try:
        await say_unfollowed(session, err)
        await session.data.refresh_all()
        return Exit(await Shell(session, history=history_file(state_dir()), json_output=args.json).run())
    finally:
        await close_session(session)


async def cmd_tui(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO, hint: str | None = None,
                  select: str | None = None) -> Exit:
    from kvmshell.tui.app import run_tui
    session = await open_session(args, config, err, interactive=True)
    if select is not None:
        session.current = select
    try:
        await session.data.refresh_all()
        return Exit(await run_tui(session, hint=hint))
    finally:
        await close_session(session)
