"""What handlers return: plain data with a plain-text rendering and a JSON form.

The faces decide colours and layout; ``text()`` is what `-c`, `run` and the shell print by default,
``to_json()`` what they print with `--json`: a handler whose text holds figures gives ``data``, their
JSON form (numbers as numbers, units in the key names: see ``core.values.jsonform``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class Result:
    ok = True

    def text(self) -> str:
        raise NotImplementedError

    def to_json(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Done(Result):
    """A command that worked and has nothing to show but, maybe, a note."""

    message: str = ""
    warnings: tuple[str, ...] = ()

    def text(self) -> str:
        return "\n".join([*(f"warning: {w}" for w in self.warnings), *([self.message] if self.message else [])])

    def to_json(self) -> Any:
        return {"ok": True, "message": self.message, "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Text(Result):
    body: str
    data: Any = None

    def text(self) -> str:
        return self.body

    def to_json(self) -> Any:
        return self.data if self.data is not None else {"output": self.body}


@dataclass(frozen=True)
class KeyValues(Result):
    items: tuple[tuple[str, Any], ...]
    title: str = ""
    data: Any = None

    def text(self) -> str:
        lines = [self.title] if self.title else []
        lines += [f"{k}: {_fmt(v)}" for k, v in self.items]
        return "\n".join(lines)

    def to_json(self) -> Any:
        return self.data if self.data is not None else {k: v for k, v in self.items}


@dataclass(frozen=True)
class Table(Result):
    headers: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    empty: str = "(none)"
    data: Any = None

    def text(self) -> str:
        if not self.rows:
            return self.empty
        cells = [self.headers] + [tuple(_fmt(c) for c in r) for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)

    def to_json(self) -> Any:
        if self.data is not None:
            return self.data
        keys = [h.lower().replace(" ", "_") for h in self.headers]
        return [dict(zip(keys, r)) for r in self.rows]


@dataclass(frozen=True)
class Json(Result):
    value: Any

    def text(self) -> str:
        return json.dumps(self.value, indent=2, sort_keys=True)

    def to_json(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Watch(Result):
    """Ask the face to show ``line`` live, refreshed every ``interval`` seconds, until interrupted."""

    line: str
    interval: float = 0.5

    def text(self) -> str:
        return f"(watch {self.line})"

    def to_json(self) -> Any:
        return {"watch": self.line, "interval": self.interval}


@dataclass(frozen=True)
class Exit(Result):
    def text(self) -> str:
        return ""

    def to_json(self) -> Any:
        return {"exit": True}


@dataclass(frozen=True)
class Outcome:
    """The result of a line on one guest (guest None for shell commands), or its error."""

    guest: str | None
    result: Result | None = None
    error: str | None = None
    error_title: str = "error"
    notes: Sequence[str] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.error is None


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None:
        return "-"
    return str(v)
