"""`kvmshell shell`: the prompt over a Session.

``prompt_async`` under ``patch_stdout`` so guest events print above the line being typed; completion
from the core's CompletionEngine (cached data, never waiting on a guest); a bottom toolbar that
reads cached state; history in the XDG state dir with Ctrl-R search. Ctrl-C clears the line (or
stops a watch or a running command), Ctrl-D leaves.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from kvmshell.core.commands.results import Exit, Watch
from kvmshell.core.commands.completion import CompletionEngine
from kvmshell.core.values.models import Event
from kvmshell.core.commands.session import Session
from kvmshell.shell.render import event_line, outcome_lines

log = logging.getLogger(__name__)

STYLE = Style.from_dict({
    "prompt": "bold ansicyan",
    "header": "bold",
    "error": "ansired",
    "warning": "ansiyellow",
    "event": "ansimagenta",
    "progress": "ansibrightblack",
    "bottom-toolbar": "noreverse bg:ansibrightblack fg:ansiwhite",
})


class ShellCompleter(Completer):
    """prompt_toolkit's side of the core's completion engine."""

    def __init__(self, engine: CompletionEngine) -> None:
        self.engine = engine

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        for c in self.engine.complete(document.text_before_cursor):
            yield Completion(c.text, start_position=c.start, display=c.display or c.text, display_meta=c.meta)


class Shell:
    def __init__(self, session: Session, *, history: History | None = None, input: Input | None = None,
                 output: Output | None = None, json_output: bool = False) -> None:
        self.session = session
        self.engine = CompletionEngine(session)
        self.json_output = json_output
        self._lost: set[str] = set()
        self.prompt = PromptSession[str](
            completer=ShellCompleter(self.engine), complete_while_typing=True, history=history or InMemoryHistory(),
            enable_history_search=False, bottom_toolbar=self.toolbar, style=STYLE, input=input, output=output,
            mouse_support=False)
        self._confirm_prompt = PromptSession[str](input=input, output=output, style=STYLE)
        session.confirmer = self.confirm
        session.editor = self.edit
        session.progress_sink = self.show_progress
        self._held: list[list[tuple[str, str]]] | None = None     # output held while an editor runs

    # -- pieces the prompt reads (cached state only) ------------------------------------------
    def prompt_text(self) -> FormattedText:
        name = self.session.current or "kvmshell"
        return FormattedText([("class:prompt", f"{name}> ")])

    def toolbar(self) -> FormattedText:
        s = self.session
        name = s.current
        if name is None:
            return FormattedText([("", f" {len(s.fleet)} guests - `use NAME` to pick one, @NAME or @all to target ")])
        g = s.fleet.get(name)
        data = s.data.get(name)
        parts = [f" {name}", g.address.protocol.value]
        parts.append(str(data.status) if data.status and g.monitor and g.monitor.connected else g.state.value)
        if data.migration is not None and data.migration.status.is_active:
            ram = data.migration.ram
            left = f", {ram.remaining / 2**20:.0f} MiB left" if ram else ""
            parts.append(f"migration {data.migration.status}{left}")
        return FormattedText([("", " | ".join(parts) + " ")])

    def echo(self, lines: Iterable[tuple[str, str]]) -> None:
        if self._held is not None:
            self._held.append(list(lines))
            return
        for style, text in lines:
            print_formatted_text(FormattedText([(style, text)]), style=STYLE, output=self.prompt.output)

    def show_progress(self, guest: str, message: str) -> None:
        self.echo([("class:progress", f"  {guest}: {message}" if guest else f"  {message}")])

    async def edit(self, text: str) -> str:
        """The session's editor: $EDITOR owns the terminal meanwhile; events are shown after."""
        from kvmshell.core.commands.editor import edit_text
        self._held = []
        try:
            return await asyncio.to_thread(edit_text, text)
        finally:
            held, self._held = self._held, None
            for lines in held:
                self.echo(lines)

    async def confirm(self, question: str) -> bool:
        try:
            answer = await self._confirm_prompt.prompt_async(f"{question} [y/N] ")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")

    def on_event(self, ev: Event) -> None:
        if ev.name in ("MIGRATION", "STOP", "RESUME"):
            self.session.data.schedule(ev.guest, "status", "migration")
        line = event_line(ev)
        if ev.name == "MIGRATION" and ev.guest in self.session.migrations:
            line = None                     # kvmshell follows it: its own notice says more
        if ev.name == "kvmshell.DISCONNECTED":
            self._lost.add(ev.guest)
        elif ev.name == "kvmshell.CONNECTED" and ev.guest in self._lost:
            self._lost.discard(ev.guest)
            line = f"{ev.guest}: monitor back"
        if line:
            self.echo([("class:event", f"[{time.strftime('%H:%M:%S')}] {line}")])

    # -- the loop -----------------------------------------------------------------------------
    async def _keep_toolbar_true(self, every: float = 1.0) -> None:
        """Refresh the current guest's state once a second (HMP guests and guests without the events
        capability say nothing by themselves) and redraw the toolbar."""
        while True:
            await asyncio.sleep(every)
            name = self.session.current
            if name is not None:
                await self.session.data.refresh(name, ("status", "migration"))
                if self.prompt.app.is_running:
                    self.prompt.app.invalidate()

    async def run(self) -> int:
        unsubscribe = self.session.fleet.subscribe(self.on_event)
        for name in self.session.fleet.names:
            self.session.data.schedule(name)
        ticker = asyncio.create_task(self._keep_toolbar_true(), name="shell-toolbar")
        try:
            with patch_stdout(raw=True):
                while True:
                    try:
                        line = await self.prompt.prompt_async(self.prompt_text)
                    except KeyboardInterrupt:
                        continue                    # Ctrl-C: drop the line being typed
                    except EOFError:
                        break                       # Ctrl-D
                    if await self.run_line(line):
                        break
        finally:
            unsubscribe()
            ticker.cancel()
            try:
                await ticker
            except asyncio.CancelledError:
                pass
        return 0

    async def run_line(self, line: str) -> bool:
        """Run one line; True when the shell should end."""
        outcomes = await self._interruptible(self.session.run_line(line))
        if outcomes is None:
            self.echo([("class:error", "interrupted (QEMU may still finish the command)")])
            return False
        for o in outcomes:
            if o.ok and isinstance(o.result, Exit):
                return True
            if o.ok and isinstance(o.result, Watch):
                await self.watch(o.result.line, o.result.interval, o.guest)
                return False
        plan_explicit = line.strip().startswith("@")
        grouped = len(outcomes) > 1 or (plan_explicit and line.strip().startswith("@all"))
        self.echo(outcome_lines(outcomes, grouped))
        return False

    async def _interruptible(self, coro: Any) -> Any:
        """Await ``coro``; Ctrl-C cancels it and returns None instead of ending the program."""
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, task.cancel)
        except (NotImplementedError, RuntimeError):
            pass
        try:
            return await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            return None
        finally:
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError):
                pass

    async def watch(self, line: str, interval: float, guest: str | None) -> None:
        """Redraw ``line``'s output every ``interval`` s until Ctrl-C (nothing is cancelled)."""
        target_line = f"@{guest} {line}" if guest and not line.lstrip().startswith("@") else line
        out = self.prompt.output

        async def loop() -> None:
            while True:
                outcomes = await self.session.run_line(target_line)
                if out.get_size().rows and sys.stdout.isatty():
                    out.erase_screen()
                    out.cursor_goto(0, 0)
                    out.flush()
                self.echo([("class:header", f"{target_line} - every {interval:g} s, Ctrl-C to stop "
                                            f"[{time.strftime('%H:%M:%S')}]")])
                self.echo(outcome_lines(outcomes, len(outcomes) > 1))
                await asyncio.sleep(interval)

        await self._interruptible(loop())


def history_file(state_dir: Path) -> History:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        return FileHistory(str(state_dir / "history"))
    except OSError:
        return InMemoryHistory()


__all__ = ["Shell", "history_file"]
