"""The one call that starts a migration kvmshell runs between two attached guests (or to a URI)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from kvmshell.core.migration.live.endpoints import Notices, plan as plan_endpoints
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.live.stages import Stage
from kvmshell.core.migration.tcgdirty import tcg_dirty_check
from kvmshell.core.monitor.fleet import Fleet


async def begin(fleet: Fleet, req: MigrationRequest, stages: Sequence[Stage] = (), *, tls_root: str | None = None,
                tls_authz: bool = False, progress: Callable[[str], None] = lambda message: None) -> MigrationJob:
    """Plan the endpoints (the URI, TLS, what is unsafe about the path), build the job and prepare
    both sides; without stages that have work to do first, send `migrate` too (a failure at once is
    raised here). The caller follows the job (``run``), which starts it after the stages' work."""
    stages = list(stages)
    warnings = []
    tcg = await tcg_dirty_check(req.source, fleet.monitor(req.source))
    if tcg is not None:
        warnings.append(tcg)
    if req.dest is not None:
        ends = await plan_endpoints(fleet, req.source, req.dest, req.uri, tls_root, progress, tls_authz=tls_authz)
        req = replace(req, uri=ends.uri, tls=ends.tls)
        warnings += ends.warnings
    if warnings:
        stages.insert(0, Notices(warnings))
    job = MigrationJob.of(fleet, req, stages=stages)
    await job.prepare()
    if not job.work:
        await job.start()
    return job
