"""The real prompt (prompt_toolkit, pipe input) against real guests."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.plain_text import PlainTextOutput

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.shell.app import Shell
from tests.waiting import wait_for

pytestmark = pytest.mark.qemu


class Driver:
    def __init__(self, shell: Shell, pipe: object, buf: io.StringIO) -> None:
        self.shell, self.pipe, self.buf = shell, pipe, buf

    def type(self, text: str) -> None:
        self.pipe.send_text(text)  # type: ignore[attr-defined]

    async def until_output(self, needle: str, count: int = 1, timeout: float = 30) -> str:
        async def probe() -> str:
            return self.buf.getvalue()
        return await wait_for(probe, lambda out: out.count(needle) >= count, timeout=timeout, what=repr(needle))

    async def tab(self) -> None:
        """TAB once the completion menu for what was typed is up, as a person at the keyboard does."""
        async def probe() -> object:
            return self.shell.prompt.app.current_buffer.complete_state
        await wait_for(probe, lambda st: st is not None and bool(st.completions), timeout=10, what="completion menu")
        self.type("\t")

    async def until_line_is(self, text: str) -> None:
        async def probe() -> str:
            return self.shell.prompt.app.current_buffer.text
        await wait_for(probe, lambda t: t == text, timeout=10, what=f"input line {text!r}")


@pytest.fixture
async def driver(lab: Lab) -> AsyncIterator[Driver]:
    vm1, vm2 = await asyncio.gather(lab.start("vm1", MonitorKind.QMP_UNIX, paused=True),
                                    lab.start("vm2", MonitorKind.HMP_PTY, paused=True))
    async with Fleet() as fleet:
        fleet.add("vm1", vm1.address)
        fleet.add("vm2", vm2.address)
        await fleet.start()
        session = Session(fleet, default_registry())
        with create_pipe_input() as pipe:
            buf = io.StringIO()
            shell = Shell(session, input=pipe, output=PlainTextOutput(buf))
            task = asyncio.create_task(shell.run())
            d = Driver(shell, pipe, buf)
            try:
                yield d
                d.type("\x03\x04")                              # Ctrl-C clears the line, Ctrl-D leaves
                async with asyncio.timeout(10):
                    assert await task == 0
            finally:
                if not task.done():
                    task.cancel()
        await session.aclose()


async def test_at_all_and_use(driver: Driver) -> None:
    driver.type("@all info status\r")
    out = await driver.until_output("VM status: paused (prelaunch)", 2)
    assert "── vm1 ──" in out and "── vm2 ──" in out
    driver.type("use vm2\r")
    await driver.until_output("current guest: vm2")
    assert driver.shell.prompt_text()[0][1] == "vm2> "
    assert "vm2 | hmp" in "".join(t for _, t in driver.shell.toolbar())


async def test_savevm_then_tab_completes_the_tag_and_loadvm(driver: Driver) -> None:
    driver.type("use vm1\r")
    await driver.until_output("current guest: vm1")
    driver.type("savevm first_snapshot\r")
    await driver.until_output("saved snapshot 'first_snapshot'")
    await wait_for(lambda: _tags(driver), lambda tags: tags == ["first_snapshot"], what="cached tags")
    driver.type("loadvm fi")
    await driver.tab()
    await driver.until_line_is("loadvm first_snapshot")
    driver.type("\r")
    await driver.until_output("loaded snapshot 'first_snapshot'")
    driver.type("delvm first_snapshot\r")
    await driver.until_output("deleted snapshot 'first_snapshot'")


async def _tags(driver: Driver) -> list[str]:
    return [s.tag for s in driver.shell.session.data.tags("vm1")]


async def test_errors_ctrl_c_and_events(driver: Driver) -> None:
    driver.type("savvm x\r")
    await driver.until_output("error: usage: unknown command 'savvm' - did you mean 'savevm'?")
    driver.type("@nobody info status\r")
    await driver.until_output("no guest named 'nobody' (guests: vm1, vm2)")
    driver.type("half typed line\x03")                      # Ctrl-C drops the line, the shell goes on
    driver.type("@vm1 cont\r")
    await driver.until_output("running")
    await driver.until_output("vm1: resumed")               # the QMP event, printed above the prompt
    driver.type("@vm1 stop\r")
    await driver.until_output("vm1: stopped")
    assert "half typed" not in driver.shell.session.history[-3:]


async def test_quit_needs_confirmation(driver: Driver) -> None:
    driver.type("@vm1 quit\r")
    await driver.until_output("Quit? [y/N]")
    driver.type("n\r")
    await driver.until_output("cancelled, nothing was done")
    assert driver.shell.session.fleet.get("vm1").monitor.connected  # type: ignore[union-attr]


async def test_watch_redraws_until_ctrl_c(driver: Driver) -> None:
    """`info migrate --watch` redraws twice a second; Ctrl-C (SIGINT) returns to the prompt and
    cancels nothing."""
    import os
    import signal
    driver.type("@vm1 info migrate --watch\r")
    await driver.until_output("Ctrl-C to stop", 2, timeout=10)         # at least two frames
    os.kill(os.getpid(), signal.SIGINT)
    driver.type("@vm1 info status\r")
    await driver.until_output("VM status: paused (prelaunch)")
    assert driver.shell.session.fleet.get("vm1").monitor.connected  # type: ignore[union-attr]
