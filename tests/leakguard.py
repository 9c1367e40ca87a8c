"""A pytest plugin: each test must leave no QEMU, sshd, libvirtd or network namespace of its own
behind, and the run says how many tests started a real QEMU.

What is watched: processes whose name (``/proc/PID/comm``) is ``qemu-system-*``, ``qemu-kvm``,
``sshd*`` or ``libvirtd``, and that are this test run's: descendants of this pytest process (a walk
over the parent pids in /proc), or, when re-parented to init (a QEMU libvirt daemonised, say) and
started after this process, whose environment carries ``KVMSHELL_LEAKGUARD=<this pid>-<random>`` or
whose command line names the work directory of a ``Lab`` made in this process (a private libvirtd's
QEMUs: libvirt clears their environment). Nothing weaker (a mount namespace, say, whose inode number
another namespace takes once it is gone): other people's QEMUs run on the same machine, and the
guard kills what it finds. Network namespaces: those of every ``kvmshell.lab.netns.TestNetwork`` made
in this process (``<id>-src``, ``<id>-dst``), as ``ip netns list`` shows them.

When: a snapshot before a test's setup (the previous test's last one), a check after its teardown
(function-scoped fixtures are torn down by then). What a module-, class- or session-scoped fixture
starts while it is set up belongs to that fixture, not to the test that set it up: it is checked
when the fixture is torn down. Anything new still there gets up to ``GRACE`` s to go (a QEMU being reaped, an sshd session
closing); what remains is killed (and a namespace deleted) so that the next test starts clean, and
the test fails in its teardown with the pid and command line of each.

The count: a test "started a real QEMU" when, during its setup, call or teardown, ``kvmshell.lab``
launched one (``Lab.start``, ``Lab.start_argv``, ``start_linux``; also in a kvmshell or a pytest the
test runs as a subprocess: they append to the files ``$KVMSHELL_LAUNCH_LOG`` names), or when one of this run's QEMUs
that was not there before the test is seen after its call or its teardown (a libvirt domain's).
Each worker sends its counts to the controller (xdist's ``workeroutput``), which prints one line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmshell.lab import launcher, netns

GRACE = 5.0
MARKER = "KVMSHELL_LEAKGUARD"
_WATCHED = re.compile(r"^(qemu-system-.*|qemu-kvm|sshd.*|libvirtd)$")
_ACCEL = re.compile(r"(?:-accel\x00|accel=)(\w+)")


@dataclass(frozen=True)
class Proc:
    """One process; ``start`` (clock ticks after boot) with the pid names it even if the pid is reused."""

    pid: int
    start: int
    comm: str
    cmdline: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    @property
    def is_qemu(self) -> bool:
        return self.comm.startswith("qemu-")

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm}): {self.cmdline.replace(chr(0), ' ').strip()[:300]}"


def _read(path: str, whole: bool = True) -> bytes | None:
    """A /proc file's bytes (the first read's only unless ``whole``), None once the process is gone.
    os.open/os.read: a scan reads hundreds of them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, 65536)]
        while whole and chunks[-1]:
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start time) of a process from /proc/PID/stat; None once it is gone."""
    raw = _read(f"/proc/{pid}/stat", whole=False)        # one line, well under 64 KiB
    if raw is None:
        return None
    text = raw.decode(errors="replace")
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    try:
        return head.partition("(")[2], fields[0], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def accel_of(cmdline: str) -> str:
    """"kvm", "tcg" or "?" from a QEMU command line (NULs between arguments)."""
    m = _ACCEL.search(cmdline)
    return m.group(1) if m else "?"


class Guard:
    """The processes and namespaces of one pytest process (a worker, or the only process)."""

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.marker = f"{MARKER}={owner}-{secrets.token_hex(8)}"     # a pid alone may be an old one's
        st = _stat(owner)
        self.since = st[3] if st else 0          # nothing started before this process is its
        self.netns_ids: list[str] = []           # TestNetwork ids made in this process, in order
        self.paths: list[str] = []               # and the work directories of its Labs

    def scan(self) -> dict[tuple[int, int], Proc]:
        """The watched processes of this run alive now (zombies are gone)."""
        stats: dict[int, tuple[str, str, int, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _stat(int(entry))) is not None:
                stats[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, (_, _, ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), [self.owner]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in ours:
                    ours.add(child)
                    todo.append(child)
        marker = self.marker.encode()
        found = {}
        for pid, (comm, state, _, start) in stats.items():
            if state == "Z" or not _WATCHED.match(comm):
                continue
            cmdline = (_read(f"/proc/{pid}/cmdline") or b"").decode(errors="replace")
            if pid not in ours and (start < self.since or not (
                    marker + b"\0" in (_read(f"/proc/{pid}/environ") or b"") + b"\0"
                    or any(d in cmdline for d in self.paths))):
                continue
            proc = Proc(pid, start, comm, cmdline)
            found[proc.key] = proc
        return found

    def alive(self, procs: Iterable[Proc]) -> list[Proc]:
        return [p for p in procs if (st := _stat(p.pid)) is not None and st[1] != "Z" and st[3] == p.start]

    def namespaces(self, ids: Iterable[str]) -> list[str]:
        wanted = set(ids)
        if not wanted:
            return []
        return [ns for ns in netns.leftover_namespaces("") if ns.rsplit("-", 1)[0] in wanted]

    def settle(self, procs: list[Proc], ids: list[str]) -> tuple[list[Proc], list[str]]:
        """What of ``procs`` and of the namespaces of ``ids`` is still there after up to GRACE s."""
        deadline = time.monotonic() + GRACE
        while True:
            left, spaces = self.alive(procs), self.namespaces(ids)
            if not (left or spaces) or time.monotonic() >= deadline:
                return left, spaces
            time.sleep(0.05)

    def remove(self, procs: list[Proc], spaces: list[str]) -> None:
        """Kill what a test left (the exact processes seen) and delete its namespaces."""
        for p in self.alive(procs):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns in spaces:
            inside = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                    timeout=30).stdout.split()
            mine = self.scan()
            for p in mine.values():
                if str(p.pid) in inside:
                    os.kill(p.pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        deadline = time.monotonic() + GRACE
        while self.alive(procs) and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class _Window:
    """One test, from the start of its setup to the end of its teardown."""

    before: dict[tuple[int, int], Proc]
    launches_at: int
    netns_at: int
    exempt: set[tuple[int, int]] = field(default_factory=set)
    exempt_ids: set[str] = field(default_factory=set)
    qemus: dict[int, str] = field(default_factory=dict)       # pid -> accel
    skipped: bool = False


class LeakGuardPlugin:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.guard: Guard | None = None
        fd, path = tempfile.mkstemp(prefix="kvmshell-launches-", suffix=".log")
        os.close(fd)
        self.launch_log = Path(path)
        self.window: _Window | None = None
        self.last_scan: dict[tuple[int, int], Proc] | None = None
        self.fixtures: dict[int, tuple[list[Proc], list[str], str]] = {}
        self.records: dict[str, dict[str, object]] = {}       # nodeid -> {"qemu": [accel...], "ran": bool}
        self.leaks: list[str] = []
        self._inits = (netns.TestNetwork.__init__, launcher.Lab.__init__)

    # --- set-up and the end of the session -----------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        outer = os.environ.get(launcher.LAUNCH_LOG_ENV)      # a pytest run by a test: that test counts too
        os.environ[launcher.LAUNCH_LOG_ENV] = os.pathsep.join(filter(None, [str(self.launch_log), outer]))
        self.guard = guard = Guard(os.getpid())
        name, _, value = guard.marker.partition("=")
        os.environ[name] = value
        network_init, lab_init = self._inits

        def recording_network_init(network: netns.TestNetwork, *args: object, **kwargs: object) -> None:
            network_init(network, *args, **kwargs)      # type: ignore[arg-type]
            guard.netns_ids.append(network.id)

        def recording_lab_init(lab: launcher.Lab, *args: object, **kwargs: object) -> None:
            lab_init(lab, *args, **kwargs)      # type: ignore[arg-type]
            guard.paths.append(str(lab.workdir).rstrip("/") + "/")
        netns.TestNetwork.__init__ = recording_network_init      # type: ignore[method-assign]
        launcher.Lab.__init__ = recording_lab_init      # type: ignore[method-assign]

    def stop(self) -> None:
        netns.TestNetwork.__init__, launcher.Lab.__init__ = self._inits      # type: ignore[method-assign]
        self.launch_log.unlink(missing_ok=True)

    def _launches(self, since: int) -> tuple[dict[int, str], int]:
        """pid -> accel of the QEMUs kvmshell.lab launched since byte ``since`` of the log; the new end."""
        data = self.launch_log.read_bytes() if self.launch_log.exists() else b""
        found = {}
        for line in data[since:].decode(errors="replace").splitlines():
            pid, _, accel = line.partition(" ")
            if pid.isdigit():
                found[int(pid)] = accel.split(",")[0] or "?"
        return found, len(data)

    # --- one test ------------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        assert self.guard is not None
        before, self.last_scan = self.last_scan or self.guard.scan(), None     # the last test's end will do
        self.window = _Window(before, self.launch_log.stat().st_size, len(self.guard.netns_ids))
        return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self._observe()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if self.window is not None and report.skipped and report.when in ("setup", "call"):
            self.window.skipped = True
        return report

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self._end_test(item)

    def _observe(self) -> None:
        """Note this run's QEMUs that were not there before the test (libvirt's are not in the log)."""
        if self.guard is None or self.window is None:
            return
        w = self.window
        for key, p in self.guard.scan().items():
            if p.is_qemu and key not in w.before:
                w.qemus.setdefault(p.pid, accel_of(p.cmdline))

    def _end_test(self, item: pytest.Item) -> None:
        assert self.guard is not None
        w, self.window = self.window, None
        if w is None:
            return
        now = self.last_scan = self.guard.scan()
        for key, p in now.items():
            if p.is_qemu and key not in w.before:
                w.qemus.setdefault(p.pid, accel_of(p.cmdline))
        launched, _ = self._launches(w.launches_at)
        for pid, accel in launched.items():
            w.qemus.setdefault(pid, accel)
        self.records[item.nodeid] = {"qemu": sorted(w.qemus.values()), "ran": not w.skipped}
        new = [p for key, p in now.items() if key not in w.before and key not in w.exempt]
        ids = [i for i in self.guard.netns_ids[w.netns_at:] if i not in w.exempt_ids]
        self._check(new, ids, f"test {item.nodeid}")

    def _check(self, procs: list[Proc], ids: list[str], who: str) -> None:
        assert self.guard is not None
        left, spaces = self.guard.settle(procs, ids)
        if not (left or spaces):
            return
        self.guard.remove(left, spaces)
        what = [p.describe() for p in left] + [f"network namespace {ns}" for ns in spaces]
        self.leaks.append(f"{who}: " + ", ".join([f"pid {p.pid} ({p.comm})" for p in left] + spaces))
        pytest.fail(f"leak guard: {who} left {len(what)} behind (still there {GRACE:.0f} s after its teardown; "
                    "killed now):"
                    "\n  " + "\n  ".join(what), pytrace=False)

    # --- fixtures wider than a test ------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
                             ) -> Generator[None, object, object]:
        if fixturedef.scope == "function" or self.guard is None:
            return (yield)
        before, ids_at = self.guard.scan(), len(self.guard.netns_ids)
        try:
            return (yield)
        finally:
            started = [p for key, p in self.guard.scan().items() if key not in before]
            ids = self.guard.netns_ids[ids_at:]
            self.fixtures[id(fixturedef)] = (started, ids, f"{fixturedef.scope} fixture {fixturedef.argname}")
            if self.window is not None:
                self.window.exempt.update(p.key for p in started)
                self.window.exempt_ids.update(ids)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
                                      ) -> Generator[None, object, object]:
        result = yield
        started = self.fixtures.pop(id(fixturedef), None)
        if started is not None:
            self._check(*started)
        return result

    # --- the end of the run --------------------------------------------------------------------

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.guard is not None:
            left = list(self.guard.scan().values())
            if left:
                self.guard.remove(left, [])
                self.leaks.append("the session: " + ", ".join(p.describe() for p in left))
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        self.launch_log.unlink(missing_ok=True)      # here: an xdist worker may never run its config's cleanups
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["leakguard"] = json.dumps({"records": self.records, "leaks": self.leaks})

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: object, error: object) -> None:
        out = getattr(node, "workeroutput", {}).get("leakguard")
        if out:
            data = json.loads(out)
            self.records.update(data["records"])
            self.leaks.extend(data["leaks"])

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_line(summary_line(self.records))
        for leak in self.leaks:
            terminalreporter.write_line(f"leak guard: {leak}", red=True)


def summary_line(records: dict[str, dict[str, object]]) -> str:
    """"N of M tests started a real QEMU (...)": M counts the tests that ran (not skipped)."""
    ran = [r for r in records.values() if r["ran"]]
    by_accel: dict[str, int] = {}
    for r in ran:
        accels = sorted(set(r["qemu"]))          # type: ignore[call-overload]
        if accels:
            kind = " and ".join(a.upper() for a in accels)
            by_accel[kind] = by_accel.get(kind, 0) + 1
    started = sum(by_accel.values())
    detail = ", ".join(f"{n} under {kind}" for kind, n in sorted(by_accel.items(), key=lambda kv: -kv[1]))
    return f"{started} of {len(ran)} tests started a real QEMU" + (f" ({detail})" if detail else "")


def pytest_configure(config: pytest.Config) -> None:
    plugin = LeakGuardPlugin(config)
    config.pluginmanager.register(plugin, "kvmshell-leakguard")
    config.add_cleanup(plugin.stop)
