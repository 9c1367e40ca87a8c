"""Logging goes to a file in the XDG state directory, never to the terminal a UI is drawing on.

The file is rotated: at ``MAX_BYTES`` it becomes ``kvmshell.log.1`` (the older ones shift up to
``.BACKUPS``, the oldest is dropped), so a long-lived shell or dashboard never fills the disk."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

from kvmshell.config import state_dir

MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3


def setup_logging(level: str | None = None, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> Path | None:
    """Send every log record (ours and qemu.qmp's) to ``kvmshell.log``, rotated at ``max_bytes`` with
    ``backups`` old files kept; return its path."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level_name = (level or os.environ.get("KVMSHELL_LOG_LEVEL") or "INFO").upper()
    root.setLevel(getattr(logging, level_name, logging.INFO))
    path: Path | None = state_dir() / "kvmshell.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    except OSError:
        handler, path = logging.NullHandler(), None
    root.addHandler(handler)
    return path
