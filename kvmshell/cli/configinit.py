"""`kvmshell config init`: write a commented config file where kvmshell looks for one, never over one.

Every key that kvmshell.config accepts is in the file, commented out with its default or an example:
a line ``#key = value`` is a setting (remove the ``#`` to use it), ``# text`` explains.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from kvmshell.cli.common import Exit
from kvmshell.config import default_path
from kvmshell.errors import ConfigError

TEMPLATE = """\
# kvmshell config: the guests and hosts kvmshell attaches to, and the defaults of its migrations.
# A line `#key = value` is a setting, commented out: remove its `#` to use it. Unknown keys are
# refused with the file and the key named. See `kvmshell --help` and the README.

# [defaults]: what every command uses unless it is told otherwise.
#[defaults]
#downtime_ms = 300          # the longest pause migrate --to aims for, in milliseconds
#strategy = "auto"          # precopy | converge | postcopy | auto
#allow_postcopy = false     # may auto switch a migration to postcopy?
#link = "1gbit"             # the migration link's speed, for the model (e.g. 100mbit, 10gbit)
#stall_timeout = 10         # cancel a migration after this many seconds without progress
#setup_timeout = 60         # cancel a migration still in its setup (libvirt preparing the destination) after this long
#connect_timeout = 5        # seconds to reach one guest's monitor
#timeout = 10               # seconds one monitor command may take

# [hosts.NAME]: a machine reached over SSH (asyncssh reads ~/.ssh/config, the agent, the key files).
#[hosts.host2]
#ssh = "root@host2.example:22"           # [USER@]HOST[:PORT]
#identity_file = "~/.ssh/id_ed25519"     # a key to offer besides the usual ones
#jump = "admin@bastion.example:22"       # go through another [hosts.NAME] or USER@HOST[:PORT] (ssh -J)
#accept_new_host_key = false             # true: accept a host key not yet known, once, and record it
#tls_dir = "/etc/pki/qemu-migration"     # where migrate --tls puts this host's certificates
#libvirt = "qemu+ssh://root@host2.example/system"  # its libvirt (default: over SSH to ssh above, known_hosts checked)

# [guests.NAME]: a QEMU guest by its monitor, PROTO:KIND:TARGET (qmp|hmp, unix|tcp|pty).
#[guests.vm1]
#monitor = "qmp:unix:/run/vm1.qmp"       # QEMU started with -qmp unix:/run/vm1.qmp,server=on,wait=off
#
#[guests.vm2]
#monitor = "qmp:unix:/run/vm2.qmp"
#host = "host2"                          # the monitor is on [hosts.host2], reached over SSH
#unplug = ["hostnet0"]                   # devices unplugged before every migration, plugged back after
#copy_storage = "all"                    # no shared storage: migrate --to copies the disks (all | inc)
#
# [guests.NAME] libvirt = "DOMAIN": a guest libvirt manages (it holds the monitor; kvmshell goes through
# libvirt's API). With host: that host's libvirt; else $LIBVIRT_DEFAULT_URI or qemu:///system.
#[guests.web1]
#libvirt = "web1"                        # or "URI#DOMAIN", e.g. "qemu+ssh://root@host3/system#web1"
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config = sub.add_parser("config", help="write a commented config file (config init)")
    action = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    action.add_parser("init", help="write a commented config file to the --config, $KVMSHELL_CONFIG or XDG "
                      "path; never over an existing one")


def cmd_config(args: argparse.Namespace, out: TextIO) -> Exit:
    path = Path(args.config).expanduser() if args.config else default_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:     # "x": never over an existing file, even in a race
            f.write(TEMPLATE)
    except FileExistsError:
        raise ConfigError(f"config init: {path} exists already; edit it, or move it away for a fresh one") \
            from None
    except OSError as e:
        raise ConfigError(f"config init: cannot write {path}: {e.strerror}") from None
    out.write(f"wrote {path}: every setting is commented out; remove the # of those you want\n")
    return Exit.OK
