"""Logging goes to a file in the XDG state directory, never to the terminal a UI is drawing on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvmshell.config import state_dir


def setup_logging(level: str | None = None) -> Path | None:
    """Send every log record (ours and qemu.qmp's) to ``kvmshell.log``; return its path."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level_name = (level or os.environ.get("KVMSHELL_LOG_LEVEL") or "INFO").upper()
    root.setLevel(getattr(logging, level_name, logging.INFO))
    path: Path | None = state_dir() / "kvmshell.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    except OSError:
        handler, path = logging.NullHandler(), None
    root.addHandler(handler)
    return path
