"""The command history shared with `kvmshell shell`.

The shell keeps it with prompt_toolkit's ``FileHistory``; this reads and appends the same format
without importing prompt_toolkit (the two faces never import each other):

    <blank line>
    # 2026-11-26 07:09:05.123456
    +first line of the entry
    +second line, for a multi-line entry
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

log = logging.getLogger(__name__)

MAX_ENTRIES = 1000


def parse_history(text: str) -> list[str]:
    """Entries oldest first, as prompt_toolkit's FileHistory reads them."""
    entries: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            entries.append("".join(lines)[:-1])     # the last line's newline is not part of the entry
            lines.clear()

    for line in text.splitlines(keepends=True):
        if line.startswith("+"):
            lines.append(line[1:] if line.endswith("\n") else line[1:] + "\n")
        else:
            flush()
    flush()
    return entries


def format_entry(entry: str, when: datetime.datetime | None = None) -> str:
    stamp = when or datetime.datetime.now()
    return f"\n# {stamp}\n" + "".join(f"+{line}\n" for line in entry.split("\n"))


class History:
    """The entries (oldest first) and, when it has a file, the file they are appended to."""

    def __init__(self, path: Path | None = None, entries: list[str] | None = None) -> None:
        self.path = path
        self.entries: list[str] = list(entries or [])

    @classmethod
    def load(cls, path: Path | None) -> History:
        if path is None:
            return cls()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        except OSError as e:
            log.warning("cannot read the history %s: %s", path, e)
            return cls(None)
        return cls(path, parse_history(text)[-MAX_ENTRIES:])

    def append(self, entry: str) -> None:
        entry = entry.strip()
        if not entry:
            return
        if not self.entries or self.entries[-1] != entry:
            self.entries.append(entry)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(format_entry(entry))
        except OSError as e:
            log.warning("cannot append to the history %s: %s", self.path, e)
            self.path = None
