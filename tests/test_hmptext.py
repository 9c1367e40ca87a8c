"""HMP text parsers, on replies captured from QEMU 7.2.22 (the real-QEMU tests check them live)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmshell.core.values import hmptext
from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.errors import UsageError

PARAMS = """announce-initial: 50 ms
announce-max: 550 ms
cpu-throttle-tailslow: off
max-cpu-throttle: 99
tls-creds: ''
max-bandwidth: 134217728 bytes/second
downtime-limit: 300 ms
block-incremental: off
multifd-compression: none
xbzrle-cache-size: 67108864 bytes
max-postcopy-bandwidth: 0"""

FAILED_MIGRATE = """globals:
store-global-state: on
only-migratable: off
clear-bitmap-shift: 18
Migration status: failed (Failed to connect to '127.0.0.1:1': Connection refused)
total time: 0 ms"""

SNAPSHOTS = """List of snapshots present on all disks:
ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
--        t1                672 KiB 2026-11-26 06:42:06 00:00:06.010           
--        with space        1.5 MiB 2026-11-26 06:43:00 00:01:02.500           """


def test_status() -> None:
    assert hmptext.parse_status("VM status: running").state is RunState.RUNNING
    st_ = hmptext.parse_status("VM status: paused (restore-vm)")
    assert st_.state is RunState.RESTORE_VM and not st_.running
    assert hmptext.parse_status("VM status: paused").state is RunState.PAUSED
    with pytest.raises(ValueError):
        hmptext.parse_status("hello")


def test_version_glued_package() -> None:
    v = hmptext.parse_version("7.2.22Debian 1:7.2+dfsg-7+deb12u18+b3")
    assert (v.major, v.minor, v.micro) == (7, 2, 22) and v.package.startswith("Debian")


def test_parameters() -> None:
    p = hmptext.parse_migrate_parameters(PARAMS)
    assert p.max_bandwidth == 134217728 and p.downtime_limit_ms == 300
    assert p.get("tls-creds") == "" and p.get("block-incremental") is False
    assert p.get("multifd-compression") == "none" and p.get("announce-initial") == 50


def test_migrate_idle_and_failed() -> None:
    assert hmptext.parse_migrate("globals:\nstore-global-state: on").status is MigrationStatus.NONE
    info = hmptext.parse_migrate(FAILED_MIGRATE)
    assert info.status is MigrationStatus.FAILED and "Connection refused" in (info.error or "")
    assert info.total_time_ms == 0


def test_snapshots() -> None:
    snaps = hmptext.parse_snapshots(SNAPSHOTS)
    assert [s.tag for s in snaps] == ["t1", "with space"]
    assert snaps[0].vm_state_size == 672 * 1024 and snaps[1].vm_state_size == int(1.5 * 1024**2)
    assert snaps[1].vm_clock_ns == 62_500_000_000
    assert hmptext.parse_snapshots("There is no snapshot available.") == ()


@pytest.mark.parametrize("reply, error", [
    ("unknown command: 'savvm'", "unknown command: 'savvm'"),
    ("Error: Snapshot 'x' does not exist in one or more devices", "Snapshot 'x' does not exist"),
    ("Expected 'on' or 'off'\nTry \"help migrate_set_capability\" for more information", "Expected 'on' or 'off'"),
    ("migrate: string expected\nTry \"help migrate\" for more information", "migrate: string expected"),
    ("no block device can store vmstate for snapshot", "no block device can store vmstate"),
])
def test_errors_recognised(reply: str, error: str) -> None:
    found = hmptext.error_in(reply)
    assert found is not None and error in found


@pytest.mark.parametrize("reply", ["", "VM status: running", PARAMS, SNAPSHOTS, FAILED_MIGRATE])
def test_ordinary_output_is_not_an_error(reply: str) -> None:
    assert hmptext.error_in(reply) is None


def test_ansi_echo_stripped() -> None:
    assert hmptext.strip_ansi("i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinfo\x1b[K") == "iininfo"


@given(st.text(max_size=300))
def test_parsers_never_crash_on_junk(text: str) -> None:
    hmptext.error_in(text)
    hmptext.parse_migrate(text)
    hmptext.parse_migrate_parameters(text)
    hmptext.parse_migrate_capabilities(text)
    hmptext.parse_snapshots(text)
    hmptext.parse_help(text)


DIRTY_NOT_READY = ("Status: unstarted\nStart Time: 12883 (ms)\nSample Pages: 512 (per GB)\nPeriod: 1 (sec)\n"
                   "Mode: page-sampling\nDirty rate: (not ready)")
DIRTY_MEASURED = ("Status: measured\nStart Time: 12883 (ms)\nSample Pages: 512 (per GB)\nPeriod: 1 (sec)\n"
                  "Mode: page-sampling\nDirty rate: 99 (MB/s)")


def test_dirty_rate() -> None:
    waiting = hmptext.parse_dirty_rate(DIRTY_NOT_READY)
    assert waiting.status == "unstarted" and not waiting.measured and waiting.dirty_rate_mb is None
    done = hmptext.parse_dirty_rate(DIRTY_MEASURED)
    assert done.measured and done.dirty_rate_mb == 99 and done.bytes_per_s == 99 * 2**20
    assert (done.calc_time_s, done.sample_pages, done.mode, done.start_time) == (1, 512, "page-sampling", 12883)
    with pytest.raises(ValueError):
        hmptext.parse_dirty_rate("Starting dirty rate measurement with period 1 seconds")


def test_cpus_memory_and_qom() -> None:
    assert hmptext.parse_cpu_count("* CPU #0: thread_id=8806\n  CPU #1: thread_id=8807") == 2
    assert hmptext.parse_memory_size("base memory: 67108864\nplugged memory: 0") == 64 << 20
    with pytest.raises(ValueError):
        hmptext.parse_memory_size("unknown")
    assert hmptext.parse_qom_list("type (string)\npc.ram (child<memory-backend-ram>)") == \
        {"type": "string", "pc.ram": "child<memory-backend-ram>"}


def test_keyval_and_quote() -> None:
    assert hmptext.keyval({"qom-type": "authz-simple", "id": "az", "identity": "CN=a,O=b"}) == \
        "qom-type=authz-simple,id=az,identity=CN=a,,O=b"
    assert hmptext.keyval({"verify-peer": True, "x": False}) == "verify-peer=on,x=off"
    assert hmptext.quote("plain") == "plain"
    assert hmptext.quote("") == '""' and hmptext.quote('a "b"') == '"a \\"b\\""'


@pytest.mark.parametrize("bad", ["a\nquit", "a\rb", "a\x00b", "a\x1b[2Jb", "\t", "a\x7fb", "a\x85b"])
def test_quote_and_keyval_refuse_control_characters(bad: str) -> None:
    """A newline would end the HMP command and start another: no quoting carries it, it is refused
    (a UsageError: one line for the user, and a ValueError for a caller)."""
    for call in (lambda: hmptext.quote(bad), lambda: hmptext.keyval({"identity": bad}),
                 lambda: hmptext.keyval({bad: "x"})):
        with pytest.raises(hmptext.ControlCharacter) as info:
            call()
        assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
        assert "\n" not in str(info.value) and "control character" in str(info.value)
