"""What every part of the command line shares: the exit statuses."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1          # a command failed or a guest is unreachable
    USAGE = 2           # bad options, address or config
    INTERRUPTED = 130
