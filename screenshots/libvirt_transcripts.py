"""Re-run the README's libvirt transcripts on the tests' test hosts and print them verbatim.

    .venv/bin/python screenshots/libvirt_transcripts.py [ssh] [watch]     (as root, from the repository)

ssh: libvirt over SSH (tests/test_libvirt_static.py's hosts: sshd in each libvirtd's namespaces),
attach over `qemu+libssh` and migrate to a host with only `ssh`; watch: `info migrate --watch` from a
second kvmshell during a libvirt migration (tests/libvirtd.py's two hosts), then `virsh list` on both.
Everything lives under /tmp/t (short, real paths), which must not exist; the daemons stop at the end.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())

from kvmshell.lab.launcher import Lab  # noqa: E402
from tests.libvirtd import libvirt_ssh_hosts, two_libvirt_hosts  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

ROOT = Path("/tmp/t")
KVMSHELL = str(Path(sys.executable).parent / "kvmshell")


def show(args: list[str]) -> str:
    return "$ kvmshell " + " ".join(shlex.quote(a) for a in args)


async def run(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(KVMSHELL, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return f"{show(list(args))}\n{out.decode()}"


async def sh(line: str) -> str:
    proc = await asyncio.create_subprocess_shell(line, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return f"$ {line}\n{out.decode()}"


async def over_ssh(lab: Lab) -> None:
    async with libvirt_ssh_hosts(lab, ROOT) as (bed, src, dst):
        home = ROOT / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "known_hosts").write_text(bed["a"].known_hosts_line() + bed["b"].known_hosts_line())
        (home / ".config" / "kvmshell").mkdir(parents=True)
        (home / ".config" / "kvmshell" / "config.toml").write_text(bed.config_toml())
        env = {k: v for k, v in os.environ.items() if k not in ("KVMSHELL_CONFIG", "XDG_CONFIG_HOME")}
        env |= {"HOME": str(home), "XDG_STATE_HOME": str(ROOT / "state")}
        await src.define("r1", ws_pages=512)
        a = bed["a"]
        uri = (f"qemu+libssh://{a.user}@{a.addr}:22/system?known_hosts={home}/.ssh/known_hosts"
               f"&known_hosts_verify=normal&keyfile={bed.client_key}")
        print("$ cat ~/.config/kvmshell/config.toml")
        print(bed.config_toml(), end="")
        print(await run(env, "--guest", f"r1=libvirt:{uri}#r1", "-c", "info status"), end="")
        print(await run(env, "--guest", f"r1=libvirt:{uri}#r1", "-c",
                        f"migrate --to-host b --address {bed.net.dst.ip} --unsafe --persistent --undefine-source"),
              end="")
        for lv in (src, dst):
            print(await sh(f"virsh -c '{lv.uri}' list --all"), end="")


async def watch(lab: Lab) -> None:
    async with two_libvirt_hosts(lab, ROOT) as h:
        dom = await h.src.define("w1", ws_pages=2048)
        env = {k: v for k, v in os.environ.items() if k != "KVMSHELL_CONFIG"}
        env |= {"XDG_CONFIG_HOME": str(ROOT / "config"), "XDG_STATE_HOME": str(ROOT / "state")}
        g = f"w1=libvirt:{h.src.uri}#w1"
        first = asyncio.ensure_future(run(env, "--guest", g, "-c", f"migrate --to-host h2 --address {h.net.dst.ip} "
                                          "--unsafe --persistent --undefine-source --strategy postcopy --bandwidth 3M "
                                          "--downtime 400"))

        def moving() -> int:
            try:
                return int(dom.jobStats().get("memory_processed", 0))
            except Exception:
                return 0
        await wait_for(lambda: asyncio.to_thread(moving), lambda n: n > 0, timeout=60, what="libvirt's job moving")
        args = ["--guest", g, "-c", "info migrate --watch"]
        proc = await asyncio.create_subprocess_exec(KVMSHELL, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        seen = b""
        while b"not followed" not in seen:
            seen += await proc.stdout.readline()
        proc.send_signal(signal.SIGINT)             # Ctrl-C after the first frame
        rest, _ = await proc.communicate()
        print((await first), end="")
        print(f"{show(args)}     # meanwhile; Ctrl-C after the first frame\n{(seen + rest).decode()}", end="")
        print(await sh(f"virsh -c '{h.src.uri}' list --all | tail -n +3; virsh -c '{h.dst.uri}' list --all | tail -n +3"),
              end="")


async def main() -> None:
    if ROOT.exists():
        raise SystemExit(f"{ROOT} exists: remove it first (the transcripts show its paths)")
    async with Lab() as lab:
        which = sys.argv[1:] or ["ssh", "watch"]
        if "ssh" in which:
            print("=== libvirt over SSH")
            await over_ssh(lab)
        if "watch" in which:
            print("=== info migrate --watch")
            await watch(lab)


asyncio.run(main())
