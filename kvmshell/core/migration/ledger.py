"""What a migration that moves a guest to another host did, undid and kept, and what it has to say
(notes, warnings): both engines (static, crosshost) and the twin they start write into one, and every
failure message is built from it, so that each names what was touched and in what state it is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ledger:
    """One run's record: ``done`` (in order), ``undone`` and ``kept`` by the undo, ``after`` (where the
    source stands once undone), ``notes`` and ``warnings`` for the result."""

    done: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    after: str = ""

    def story(self, step: str, message: str, *, verb: str = "failed") -> str:
        """The failure message of a run: the step that failed (or was interrupted) and why, then what was
        done, undone and kept, and where the source stands."""
        parts = [f"{step} {verb}: {message}", f"done: {'; '.join(self.done)}" if self.done else "nothing was done"]
        if self.undone:
            parts.append(f"undone: {'; '.join(self.undone)}")
        if self.kept:
            parts.append(f"kept: {'; '.join(self.kept)}")
        if self.after:
            parts.append(self.after)
        return ". ".join(parts)

    def short(self, step: str, message: str) -> str:
        """The failure message of a single step (nothing done before it): why, and what was undone."""
        undone = f"; undone: {'; '.join(self.undone)}" if self.undone else ""
        return f"{step} failed: {message}{undone}"


__all__ = ["Ledger"]
