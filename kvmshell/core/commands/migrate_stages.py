"""The stages a `migrate` line asks for (--unplug/--replug, --copy-storage, or the guest's config),
checked against the flags before anything is sent."""

from __future__ import annotations

from kvmshell.core.commands.migrate_request import MigrateRequest
from kvmshell.core.commands.session import Invocation
from kvmshell.core.migration.live.passthrough import PassthroughStage, parse_replug
from kvmshell.core.migration.live.stages import Stage
from kvmshell.core.migration.live.storage import MODES, StorageStage, can_mirror
from kvmshell.errors import Refused, UsageError


def copy_storage_of(inv: Invocation, req: MigrateRequest) -> str | None:
    """--copy-storage, else the guest's `copy_storage` in the config (all, inc or None)."""
    cfg = inv.session.config.guests.get(req.source)
    return req.copy_storage or (cfg.copy_storage if cfg is not None else None)


def stages_for(inv: Invocation, req: MigrateRequest) -> list[Stage]:
    """The stages the request asks for, in the order they run: devices leave before the disks are
    mirrored and come back after."""
    stages: list[Stage] = []
    source, dest = req.source, req.dest
    guest_cfg = inv.session.config.guests.get(source)
    unplug = list(req.unplug) or list(guest_cfg.unplug if guest_cfg is not None else ())
    if unplug or req.replug:
        stages.append(passthrough_stage(source, dest, unplug, list(req.replug)))
    copy_storage = copy_storage_of(inv, req)
    if copy_storage:
        stages.append(storage_stage(inv, source, dest, copy_storage, insecure=req.insecure_storage))
    return stages


def storage_stage(inv: Invocation, source: str, dest: str | None, mode: str, *,
                  insecure: bool = False) -> StorageStage:
    """The stage `migrate --to DEST --copy-storage all|inc` runs (checks what it can at once)."""
    if mode not in MODES:
        raise UsageError(f"--copy-storage {mode}: expected all or inc", guest=source)
    if dest is None:
        raise UsageError("--copy-storage needs --to DEST (a guest started with -incoming defer and its own "
                         "disks) or --to-host HOST", guest=source)
    fleet = inv.session.fleet
    for name in (source, dest):
        if not can_mirror(fleet.monitor(name)):
            raise Refused(f"--copy-storage needs a QMP monitor on both guests ({name} speaks HMP)", guest=source)
    stage = StorageStage(mode, insecure=insecure)
    if mode == "inc":
        stage.warnings.append(f"--copy-storage inc copies what {source}'s top images hold: {dest}'s top images must "
                              "be new (empty), or what they hold elsewhere stays there")
    return stage


def passthrough_stage(source: str, dest: str | None, unplug_ids: list[str],
                      replug_specs: list[str]) -> PassthroughStage:
    """The stage `migrate --unplug ID... --replug ID=SPEC...` (or [guests.NAME] unplug) asks for."""
    replug: dict[str, str] = {}
    for item in replug_specs:
        dev_id, spec = parse_replug(str(item), source)
        replug[dev_id] = spec
    return PassthroughStage(source, dest, [str(d) for d in unplug_ids], replug)
