"""The pieces the two engines that move a guest to another host share, without a host: the ledger's
failure messages, qemu-img's backing chain read from its JSON, and the twin's plan (its paths, the
derived command line, where it is attached)."""

from __future__ import annotations

import json

import pytest

from kvmshell.core.migration.images import parse_chain
from kvmshell.core.migration.ledger import Ledger
from kvmshell.core.migration.twin import MAX_SOCKET_PATH, TwinPlan, socket_name, sockets_fit
from kvmshell.core.values.address import Kind, Protocol, SshTarget
from kvmshell.core.values.cmdline import Option, parse_cmdline


def test_the_ledger_tells_what_was_done_undone_and_kept() -> None:
    ledger = Ledger()
    assert ledger.story("start", "boom") == "start failed: boom. nothing was done"
    assert ledger.short("start", "boom") == "start failed: boom"
    ledger.done += ["stopped vm1", "saved snapshot 't' on vm1"]
    ledger.undone.append("deleted snapshot 't'")
    ledger.kept.append("the files copied")
    ledger.after = "vm1 is running on this host, as before"
    assert ledger.story("copy", "no space") == ("copy failed: no space. done: stopped vm1; saved snapshot 't' on "
                                                "vm1. undone: deleted snapshot 't'. kept: the files copied. vm1 is "
                                                "running on this host, as before")
    assert ledger.short("start", "boom") == "start failed: boom; undone: deleted snapshot 't'"


def test_a_backing_chain_from_qemu_img_json() -> None:
    chain = parse_chain(json.dumps([
        {"filename": "/i/top.qcow2", "format": "qcow2", "virtual-size": 1 << 30},
        {"filename": "/i/mid.qcow2", "format": "qcow2", "virtual-size": 1 << 30},
        {"filename": "/i/base.raw", "format": "raw", "virtual-size": 1 << 30}]))
    assert [(f.path, f.backing, f.backing_format) for f in chain] == [
        ("/i/top.qcow2", "/i/mid.qcow2", "qcow2"), ("/i/mid.qcow2", "/i/base.raw", "raw"), ("/i/base.raw", None, None)]
    [one] = parse_chain('{"filename": "/i/a.img", "virtual-size": 512}')       # without --backing-chain
    assert (one.format, one.virtual_size, one.backing) == ("raw", 512, None)
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(ValueError):
            parse_chain(bad)


def test_the_twin_plan_derives_its_command_line_and_paths() -> None:
    cmd = parse_cmdline(["qemu-system-x86_64", "-name", "vm1", "-m", "256", "-drive", "file=/i/vm1.qcow2",
                         "-qmp", "unix:/run/vm1.qmp,server=on,wait=off", "-monitor", "stdio"])
    target = SshTarget("host2")
    plan = TwinPlan.derive(cmd, name="vm1.b", target=target, run_dir="/run/kvmshell/vm1.b",
                           mode=Option("-incoming", "defer"))
    argv = plan.command.argv()
    assert plan.pidfile == "/run/kvmshell/vm1.b/vm1.b.pid" and plan.path("mig") == "/run/kvmshell/vm1.b/vm1.b.mig"
    assert argv[-2:] == ["-incoming", "defer"] and "-daemonize" in argv and plan.pidfile in argv
    assert plan.address.protocol is Protocol.QMP and plan.address.kind is Kind.UNIX
    assert plan.address.path == "/run/kvmshell/vm1.b/vm1.b.qmp" and plan.address.ssh == target
    copy = TwinPlan.derive(cmd, name="vm1 copy", target=target, run_dir="/d/run", mode=Option("-loadvm", "t1"))
    assert copy.command.argv()[-2:] == ["-loadvm", "t1"] and "-incoming" not in copy.command.argv()
    assert socket_name("vm1 copy/x") == "vm1-copy-x" and copy.pidfile == "/d/run/vm1-copy.pid"
    assert sockets_fit("/d/run", "vm1") and not sockets_fit("/" + "d" * MAX_SOCKET_PATH, "vm1")
