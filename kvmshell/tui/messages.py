"""The dashboard's typed messages (tests observe them with ``run_test(message_hook=...)``)."""

from __future__ import annotations

from collections.abc import Sequence

from textual.message import Message

from kvmshell.core.commands.results import Outcome
from kvmshell.core.values.models import Event


class GuestEvent(Message):
    """An event from the fleet: a QMP event, or one of kvmshell's own (decisions, connection changes)."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class Polled(Message):
    """A status poll finished: the cached data may have changed. Bursts collapse into one."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Polled)


class CommandFinished(Message):
    """A command line ran (from the command bar or a dialog); one outcome per target."""

    def __init__(self, line: str, outcomes: Sequence[Outcome]) -> None:
        super().__init__()
        self.line = line
        self.outcomes = list(outcomes)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)


class ProgressNote(Message):
    """A long command's progress ("saving 'x'... 3 s")."""

    def __init__(self, guest: str, text: str) -> None:
        super().__init__()
        self.guest = guest
        self.text = text


class DirtyRateMeasured(Message):
    def __init__(self, guest: str, bytes_per_s: float | None, error: str | None = None) -> None:
        super().__init__()
        self.guest = guest
        self.bytes_per_s = bytes_per_s
        self.error = error
