"""The leak guard (tests/leakguard.py) pins a leak on the test that made it, and on no other.

A pytest run in a subprocess (two xdist workers, as `make test` runs) on a small test file whose
tests deliberately leave a lab QEMU, a network namespace and a module fixture's QEMU behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmshell.lab.launcher import pid_alive
from kvmshell.lab.netns import leftover_namespaces, netns_available
from tests.conftest import needs_qemu

ROOT = Path(__file__).resolve().parent.parent

LEAKY = '''
import subprocess
from pathlib import Path

import pytest

from kvmshell.lab.launcher import QEMU, Lab, die_with_parent
from kvmshell.lab.netns import TestNetwork, netns_available

OUT = Path(__file__).parent / "left"


@pytest.fixture(scope="module")
def module_qemu():
    """A module-wide QEMU that its fixture forgets to stop."""
    proc = subprocess.Popen([QEMU, "-nodefaults", "-display", "none", "-S", "-accel", "tcg", "-m", "16"],
                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    with open(OUT, "a") as f:
        f.write(f"module {proc.pid}\\n")
    yield proc


async def test_a_leaves_a_lab_qemu():
    lab = Lab()
    guest = await lab.start("leaky", wait_banner=False)
    with open(OUT, "a") as f:
        f.write(f"qemu {guest.pid}\\nlabdir {lab.workdir}\\n")


def test_b_after_the_leak_is_clean():
    pass


@pytest.mark.skipif(netns_available() is not None, reason="no network namespaces here")
async def test_c_leaves_a_namespace():
    net = TestNetwork(rate=None, prefix="kvleak")
    await net.__aenter__()
    with open(OUT, "a") as f:
        f.write(f"netns {net.id}\\n")


def test_d_uses_the_module_qemu(module_qemu):
    assert module_qemu.poll() is None


def test_e_after_the_module_qemu_started(module_qemu):
    pass
'''


def outcomes(output: str) -> dict[str, str]:
    """test name -> PASSED/ERROR/FAILED/SKIPPED from pytest's -rA short summary (a test can have two)."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "ERROR", "FAILED", "SKIPPED") and "::" in rest:
            name = rest.split("::", 1)[1].split(" ", 1)[0]
            found[name] = " ".join(filter(None, [found.get(name), word]))
    return found


@needs_qemu
def test_a_leak_fails_the_test_that_made_it_and_not_the_next(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n"
                                         "asyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVMSHELL_ACCEL": "tcg"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.leakguard", "-n", "2", "--dist", "loadfile",
                          "-rA", "-p", "no:cacheprovider", "test_leaky.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    out = run.stdout + run.stderr
    left = dict(line.split() for line in (tmp_path / "left").read_text().splitlines())
    got = outcomes(out)
    assert run.returncode == 1, out
    assert got["test_a_leaves_a_lab_qemu"] == "PASSED ERROR", out     # the call passed, its teardown failed
    shutil.rmtree(left["labdir"], ignore_errors=True)
    assert f"pid {left['qemu']} (qemu-system-x86): qemu-system-x86_64 -name leaky" in out, out
    assert got["test_b_after_the_leak_is_clean"] == "PASSED", out
    assert not pid_alive(int(left["qemu"])), "the guard kills what it found"
    if netns_available() is None:
        assert got["test_c_leaves_a_namespace"] == "PASSED ERROR", out
        assert f"network namespace {left['netns']}-src" in out and f"{left['netns']}-dst" in out, out
        assert not [ns for ns in leftover_namespaces(left["netns"])], "the guard deletes the namespaces"
    # the module fixture's QEMU is not the tests' leak: its own teardown (after the last test) is
    assert got["test_d_uses_the_module_qemu"] == "PASSED", out
    assert got["test_e_after_the_module_qemu_started"] == "PASSED ERROR", out
    assert "module fixture module_qemu left 1 behind" in out and f"pid {left['module']} " in out, out
    assert not pid_alive(int(left["module"]))
    # the count, gathered from the workers: the lab QEMU (logged) and the module one (seen in a scan)
    ran = 5 if netns_available() is None else 4
    assert f"2 of {ran} tests started a real QEMU (2 under TCG)" in out, out


def test_the_count_line() -> None:
    from tests.leakguard import summary_line
    records = {"a": {"qemu": ["kvm"], "ran": True}, "b": {"qemu": ["tcg", "kvm"], "ran": True},
               "c": {"qemu": [], "ran": True}, "d": {"qemu": ["tcg"], "ran": False},
               "e": {"qemu": ["kvm", "kvm"], "ran": True}}
    assert summary_line(records) == "3 of 4 tests started a real QEMU (2 under KVM, 1 under KVM and TCG)"
    assert summary_line({}) == "0 of 0 tests started a real QEMU"


def orphan(tmp_path: Path, name: str, env: dict[str, str]) -> int:
    """Start a copy of sleep called ``name`` whose parent exits at once (re-parented, as libvirt's QEMUs are)."""
    prog = tmp_path / name
    shutil.copy("/bin/sleep", prog)
    subprocess.run(["setsid", "-f", "env", "-i", *(f"{k}={v}" for k, v in env.items()), str(prog), "60"],
                   check=True, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in filter(str.isdigit, os.listdir("/proc")):
            if Path(f"/proc/{entry}/cmdline").read_bytes().startswith(str(prog).encode()):
                return int(entry)
        time.sleep(0.05)
    raise AssertionError(f"{name} did not start")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setsid") is None, reason="root, setsid (util-linux)")
def test_an_orphan_is_ours_only_with_our_marker(tmp_path: Path) -> None:
    """A process re-parented to init is this run's only if it carries this run's marker: not because
    its command line is under our temporary directory, nor because of an old pid's marker."""
    from tests.leakguard import Guard
    guard = Guard(os.getpid())
    name, _, value = guard.marker.partition("=")
    stranger = orphan(tmp_path, "sshd-stranger", {name: f"{os.getpid()}-0123456789abcdef"})
    ours = orphan(tmp_path, "sshd-ours", {name: value})
    try:
        found = {p.pid for p in guard.scan().values()}
        assert ours in found and stranger not in found, found
    finally:
        for pid in (stranger, ours):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' environment: root")
def test_the_guard_sees_only_this_runs_processes() -> None:
    from tests.leakguard import Guard
    guard = Guard(os.getpid())
    mine = guard.scan()
    for p in mine.values():
        chain, pid = [], p.pid
        while pid > 1:
            chain.append(pid)
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        assert os.getpid() in chain or guard.marker.encode() in environ, p
