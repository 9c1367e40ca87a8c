"""What a migration that moves a guest to another host did, undid and kept, and what it has to say
(notes, warnings): both engines (static, crosshost) and the twin they start write into one, and every
failure message is built from it, so that each names what was touched and in what state it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from kvmshell.errors import KvmError


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
    step: str = ""          # the step under way: what a failure inside ``undone_on_failure`` names

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

    @contextlib.asynccontextmanager
    async def undone_on_failure(self, undo: Callable[[], Awaitable[None]], progress: Callable[[str], None],
                                failed: type[KvmError], guest: str) -> AsyncIterator[None]:
        """Run the steps inside: an error (KvmError, OSError) is undone, then raised as ``failed`` with the
        story; Ctrl-C (a cancelled task) is undone out of the cancel's reach, said, and raised on."""
        try:
            yield
        except (KvmError, OSError) as e:
            await undo()
            raise failed(self.story(self.step, e.message if isinstance(e, KvmError) else str(e)), guest=guest) from None
        except BaseException:
            await asyncio.shield(undo())
            progress(self.story(self.step, "Ctrl-C", verb="interrupted"))
            raise


__all__ = ["Ledger"]
