"""Stages: parts of a migration beyond RAM that the engine (``live.MigrationJob``) runs at fixed
points, so that storage copy (NBD + mirror) and passthrough devices (unplug/replug) plug in
without the engine knowing about either.

The points, in order:

``prepare``        both sides' capabilities and parameters are set; the destination is not yet
                   listening (``migrate-incoming`` comes next). Check and set up here (NBD server
                   on the destination, recording a device).
``before_start``   the destination listens; `migrate` comes next. Long work goes here (mirror every
                   disk until it is ready, unplug a device and wait for DEVICE_DELETED).
``at_switchover``  only for a stage with ``pause_before_switchover``: the source's vCPUs are stopped
                   and QEMU waits in ``pre-switchover`` (complete the mirrors); the engine sends
                   ``migrate-continue`` after every stage returned (or cancels if one raised).
``finish``         the migration has ended with ``outcome``: on success finish on the destination
                   (plug the device there, stop the NBD server); on failure undo on the source
                   (plug the device back) so that the source runs on as it was.

A stage that raises in ``prepare``/``before_start`` stops the migration before `migrate` is sent;
the engine then calls ``finish`` with a failed outcome on every stage whose ``prepare`` was called,
in reverse order. ``finish`` must not raise for what it cannot undo: it says so in ``notes``.

A stage with work left once the migration runs says what in ``record`` (written in the state file);
the kvmshell that adopts the migration rebuilds it from that (``resume``) and the engine calls
``at_switchover`` and ``finish`` as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.migration.live.request import MigrationOutcome


class Stage(Protocol):
    name: str
    pause_before_switchover: bool
    notes: list[str]           # what it did and undid, for the outcome's message
    warnings: list[str]        # shown before the start and in the live view

    async def prepare(self, job: MigrationJob) -> None: ...

    async def before_start(self, job: MigrationJob) -> None: ...

    async def at_switchover(self, job: MigrationJob) -> None: ...

    async def finish(self, job: MigrationJob, outcome: MigrationOutcome) -> None: ...

    def lines(self) -> list[tuple[str, Any]]:
        """Rows for the live view (``info migrate``), e.g. each disk's mirror progress."""
        ...

    def record(self) -> object | None:
        """What a kvmshell that adopts the running migration needs to finish this stage (written in
        the state file, see ``resume``); None when there is nothing to finish."""
        ...


class BaseStage:
    """Does nothing at every point; stages override what they need."""

    name = "stage"
    pause_before_switchover = False

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.warnings: list[str] = []

    async def prepare(self, job: MigrationJob) -> None:
        return None

    async def before_start(self, job: MigrationJob) -> None:
        return None

    async def at_switchover(self, job: MigrationJob) -> None:
        return None

    async def finish(self, job: MigrationJob, outcome: MigrationOutcome) -> None:
        return None

    def lines(self) -> list[tuple[str, Any]]:
        return []

    def record(self) -> object | None:
        return None
