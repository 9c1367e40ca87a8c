"""What every part of the command line shares: the exit statuses, and their help."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1          # a command failed, a migration failed or was cancelled, or a guest is unreachable
    USAGE = 2           # bad options, address or config
    POSTCOPY_PAUSED = 3  # a migration broke in postcopy and waits, paused and recoverable: the guest is split
    #                      between the hosts until `migrate_recover` on the destination and `migrate -r` here
    INTERRUPTED = 130   # Ctrl-C (a migration being followed goes on in QEMU; kvmshell says how to cancel it)

    @staticmethod
    def help() -> str:
        """The statuses as `kvmshell --help` lists them."""
        return EXIT_HELP


EXIT_HELP = """\
exit status (-c, run, stdin):
  0    every line worked; a migration a line started completed
  1    a line failed, or a migration it started failed or was cancelled (the source runs on)
  2    bad options, address or config
  3    a migration broke in postcopy and is paused: recoverable, the guest is split between the hosts
       (`migrate_recover URI` on the destination, then `migrate -r URI` on the source)
  130  Ctrl-C: kvmshell stopped following; the migration goes on in QEMU (it says how to cancel it)

A migration a line starts (migrate --to, --to-host, migrate URI, static-migrate, --copy-storage) is
followed to its end: progress on stderr, the outcome on stdout. --detach leaves it to QEMU."""
