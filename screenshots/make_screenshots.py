"""Real captures of the dashboard, from real demo guests (what `kvmshell demo` starts).

    .venv/bin/python screenshots/make_screenshots.py [--out screenshots] [--size 120x36]

Drives the real app (textual's Pilot, headless) over a real Session, and writes for each picture an
SVG (textual's own screenshot) and a PNG rendering of it (rsvg-convert):

  command-bar-loadvm     the command bar completing `loadvm` with the guest's snapshot tags
  migrate-dialog         the migrate dialog with the model's prediction, before confirming
  dashboard-migrating    the dashboard mid-migration: figures, verdict, progress, sparklines, decisions
  dashboard-completed    the same migration once completed (light theme)
  will-not-converge      pre-copy capped at 5 MB/s under a guest dirtying 20 MB/s: the verdict and why
  libvirt-migrating      a guest that libvirt manages, mid-migration through libvirt to another libvirt
                         host (two libvirtds as the tests make them: tests/libvirtd.py; needs root,
                         libvirtd and the binding, else said and skipped)

`--only NAME...` makes only those groups: dashboard (the first four), non-converging, libvirt.

It checks what each picture must show and exits non-zero if a picture is not what it claims to be.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmshell.core.commands.registry import default_registry  # noqa: E402
from kvmshell.core.values.address import Address  # noqa: E402
from kvmshell.core.monitor.fleet import Fleet  # noqa: E402
from kvmshell.core.commands.session import Session  # noqa: E402
from kvmshell.lab.demo import start_demo_guests  # noqa: E402
from kvmshell.lab.launcher import Lab  # noqa: E402
from kvmshell.logsetup import setup_logging  # noqa: E402
from kvmshell.tui.app import LIGHT, KvmshellApp  # noqa: E402
from kvmshell.tui.history import History  # noqa: E402
from kvmshell.tui.messages import CommandFinished  # noqa: E402
from kvmshell.tui.screens import MigrateDialog  # noqa: E402
from kvmshell.tui.source import SessionSource  # noqa: E402
from kvmshell.tui.views import Badge  # noqa: E402
from kvmshell.tui.commandbar import CommandBar  # noqa: E402

HINT = "press m to migrate vm-src to vm-dst"


class Shot:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.made: list[Path] = []

    async def save(self, app: KvmshellApp, name: str) -> None:
        svg = self.out / f"{name}.svg"
        app.save_screenshot(svg.name, str(self.out))
        png = svg.with_suffix(".png")
        # rsvg drops the non-breaking spaces that start a run of text unless told to preserve them
        text = svg.read_text().replace("<svg class=", '<svg xml:space="preserve" class=', 1)
        proc = await asyncio.create_subprocess_exec("rsvg-convert", "-o", str(png), stdin=asyncio.subprocess.PIPE)
        await proc.communicate(text.encode())
        if proc.returncode != 0:
            raise SystemExit(f"rsvg-convert failed on {svg}")
        self.made += [svg, png]
        print(f"  {svg}  {png}", flush=True)


async def until(pilot: Any, condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause()
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise SystemExit(f"screenshots: {what} did not happen within {timeout} s")


@asynccontextmanager
async def demo_app(size: tuple[int, int]) -> AsyncIterator[tuple[KvmshellApp, Any, list[Any]]]:
    """Fresh demo guests, a session on them, and the app running headless over it."""
    async with Lab() as lab:
        guests = await start_demo_guests(lab)
        async with Fleet() as fleet:
            for g in guests:
                fleet.add(g.name, g.address)
            await fleet.start()
            session = Session(fleet, default_registry(), current="vm-src")
            await session.data.refresh_all()
            app = KvmshellApp(SessionSource(session, history=History()), hint=HINT)
            messages: list[Any] = []
            try:
                async with app.run_test(size=size, message_hook=messages.append) as pilot:
                    yield app, pilot, messages
            finally:
                await session.aclose()


def finished(messages: list[Any], prefix: str) -> list[CommandFinished]:
    return [m for m in messages if isinstance(m, CommandFinished) and m.line.startswith(prefix)]


async def run_and_wait(app: KvmshellApp, pilot: Any, messages: list[Any], line: str) -> None:
    app.run_command(line)
    done = await until(pilot, lambda: finished(messages, line), line)
    if not done[0].ok:
        raise SystemExit(f"screenshots: {line}: {done[0].outcomes[0].error}")


async def dashboard_and_dialogs(shot: Shot, size: tuple[int, int]) -> None:
    async with demo_app(size) as (app, pilot, messages):
        src = app.source
        await until(pilot, lambda: any(r.name == "vm-src" and r.ram for r in src.rows()), "the guest list")
        # two snapshots, so that the completion has something to offer
        for tag in ("before-move", "baseline"):
            await run_and_wait(app, pilot, messages, f"@vm-src savevm {tag} -y")
        await until(pilot, lambda: len(src.tags("vm-src")) == 2, "the snapshot tags in the cache")
        await pilot.press("slash", *"loadvm b")
        bar = app.query_one(CommandBar)
        await until(pilot, lambda: bar.showing and len(bar.candidates) == 2, "the loadvm completion")
        await shot.save(app, "command-bar-loadvm")
        await pilot.press("escape", "escape")

        await pilot.press("m")
        dialog = await until(pilot, lambda: isinstance(app.screen, MigrateDialog) and app.screen, "the migrate dialog")
        await until(pilot, lambda: not dialog.estimating and dialog.estimate_text, "the first prediction", timeout=60)
        await pilot.click("#bandwidth")
        await pilot.press(*"30M")
        await pilot.click("#estimate")    # the prediction for this cap
        await until(pilot, lambda: not dialog.estimating and "--link 30M" in (dialog.estimated_for or "")
                    and "auto would run" in dialog.estimate_text, "the model's prediction", timeout=60)
        await shot.save(app, "migrate-dialog")
        await pilot.click("#ok")
        await until(pilot, lambda: finished(messages, "@vm-src migrate --to vm-dst"), "the migration to start")

        def mid() -> bool:
            v = app.pane.view
            m = v.migration if v is not None else None
            return bool(m and m.running and len(m.remaining) >= 8 and m.figures.pass_no not in ("-", "1"))
        await until(pilot, mid, "the migration's second pass", timeout=60)
        await shot.save(app, "dashboard-migrating")

        def completed() -> bool:
            v = app.pane.view
            return bool(v and v.migration and v.migration.status == "completed")
        await until(pilot, completed, "the migration to complete", timeout=120)
        app.theme = LIGHT
        await pilot.pause()
        await shot.save(app, "dashboard-completed")


async def non_converging(shot: Shot, size: tuple[int, int]) -> None:
    async with demo_app(size) as (app, pilot, messages):
        await until(pilot, lambda: any(r.name == "vm-src" and r.ram for r in app.source.rows()), "the guest list")
        await pilot.press("slash", *"migrate --to vm-dst --strategy precopy --bandwidth 5M --stall-timeout 120",
                          "enter", "escape")
        await until(pilot, lambda: finished(messages, "migrate --to vm-dst"), "the migration to start")
        if not finished(messages, "migrate --to vm-dst")[0].ok:
            raise SystemExit(f"screenshots: {finished(messages, 'migrate --to vm-dst')[0].outcomes[0].error}")

        def verdict() -> bool:
            v = app.pane.view
            m = v.migration if v is not None else None
            row = next(r for r in app.source.rows() if r.name == "vm-src")
            return bool(m and m.running and m.verdict.startswith("will not converge") and not m.verdict.endswith(
                "(rough)") and row.badge is Badge.WONT_CONVERGE)
        await until(pilot, verdict, "the model to say it will not converge", timeout=180)
        await pilot.pause()
        await shot.save(app, "will-not-converge")
        await pilot.press("c")
        await pilot.press("y")
        await until(pilot, lambda: next(r for r in app.source.rows() if r.name == "vm-src").badge is Badge.CANCELLED,
                    "the cancellation")


def libvirt_missing() -> str | None:
    """Why the libvirt capture cannot be made here, or None."""
    if os.geteuid() != 0:
        return "it needs root (network, mount and UTS namespaces for the two libvirt hosts)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt binding is not installed (pip install kvmshell[libvirt])"
    if not os.path.exists("/usr/sbin/libvirtd"):
        return "libvirtd is not installed (apt-get install libvirt-daemon libvirt-daemon-driver-qemu)"
    return None


async def libvirt_migration(shot: Shot, size: tuple[int, int]) -> None:
    """The dashboard on a libvirt guest while kvmshell migrates it through libvirt to a second libvirt
    host: the tests' two test hosts (tests/libvirtd.py), each daemon stopped with its domains at the end."""
    from tests.libvirtd import two_libvirt_hosts      # pytest's helpers: only when this picture is made
    with tempfile.TemporaryDirectory(prefix="lv-") as tmp:
        async with Lab() as lab, two_libvirt_hosts(lab, Path(tmp)) as h:
            await h.src.define("web1", ws_pages=2048)
            config = h.config
            async with Fleet() as fleet:
                fleet.add("web1", Address.libvirt("web1", h.src.uri))
                await fleet.start()
                session = Session(fleet, default_registry(), config, current="web1")
                try:
                    await session.data.refresh_all()
                    app = KvmshellApp(SessionSource(session, history=History()), hint="press m to migrate web1")
                    messages: list[Any] = []
                    async with app.run_test(size=size, message_hook=messages.append) as pilot:
                        await until(pilot, lambda: any(r.name == "web1" and r.ram for r in app.source.rows()),
                                    "the guest list")
                        line = (f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe --persistent "
                                "--undefine-source --strategy postcopy --bandwidth 3M")
                        await pilot.press("slash", *line, "enter", "escape")

                        def mid() -> bool:     # 2 s into the first pass (the figures say "2.1 s")
                            v = app.pane.view
                            m = v.migration if v is not None else None
                            elapsed = m.figures.elapsed.removesuffix(" s") if m else "-"
                            return bool(m and m.running and m.status == "active" and m.figures.pass_no == "1"
                                        and elapsed.replace(".", "").isdigit() and float(elapsed) >= 2)
                        await until(pilot, mid, "the libvirt migration 2 s into its first pass", timeout=90)
                        await shot.save(app, "libvirt-migrating")
                        await until(pilot, lambda: finished(messages, "migrate --to-host"), "the migration to end",
                                    timeout=120)
                        done = finished(messages, "migrate --to-host")[0]
                        if not done.ok:
                            raise SystemExit(f"screenshots: libvirt migration: {done.outcomes[0].error}")
                finally:
                    await session.aclose()


GROUPS = ("dashboard", "non-converging", "libvirt")


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="directory for the SVG and PNG files")
    p.add_argument("--size", default="120x36", help="terminal size, COLSxROWS")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="make only these pictures")
    args = p.parse_args()
    if shutil.which("rsvg-convert") is None:
        print("screenshots: rsvg-convert is missing (apt-get install librsvg2-bin)", file=sys.stderr)
        return 2
    setup_logging()
    cols, rows = (int(x) for x in args.size.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shot = Shot(out)
    if "dashboard" in args.only:
        print("starting demo guests; the dashboard mid-migration, the dialogs:", flush=True)
        await dashboard_and_dialogs(shot, (cols, rows))
    if "non-converging" in args.only:
        print("fresh demo guests; a migration that cannot converge:", flush=True)
        await non_converging(shot, (cols, rows))
    if "libvirt" in args.only:
        missing = libvirt_missing()
        if missing is not None:
            print(f"screenshots: no libvirt capture: {missing}", file=sys.stderr)
        else:
            print("two libvirt hosts; a libvirt guest migrating through libvirt:", flush=True)
            await libvirt_migration(shot, (cols, rows))
    print(f"{len(shot.made)} files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
