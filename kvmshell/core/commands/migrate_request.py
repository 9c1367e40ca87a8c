"""`migrate` as one typed request.

A `migrate` line is parsed once into a frozen ``MigrateRequest`` (which options go together is
checked here, in one place); the dashboard's migrate dialog builds the same request from its form.
``line()`` writes a request back as the command line that means the same, for the history and for
the shell, so the grammar of `migrate` is written once.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kvmshell.core.values.units import format_rate
from kvmshell.errors import UsageError


class Mode(enum.Enum):
    PLAIN = "plain"            # `migrate URI` (-b/-i/-r): QEMU's own, followed but not steered
    STEERED = "steered"        # kvmshell runs it: --to DEST, or a URI with a strategy or a stage
    TO_HOST = "to-host"        # kvmshell starts the destination on another host
    ESTIMATE = "estimate"      # measure and predict, start nothing
    FOLLOW = "follow"          # adopt the migration that runs: kvmshell follows (and steers) it from now on


# flag name in the spec -> field of the request (where they differ)
_FIELD = {"to": "dest", "downtime": "downtime_ms", "trace": "trace", "dir": "run_dir", "b": "block", "i": "inc",
          "r": "resume", "d": "detach",
          "detach": "leave_to_qemu"}
# options that make kvmshell run the migration (a plain `migrate URI` has none of them)
_STEERING = ("dest", "strategy", "downtime_ms", "bandwidth", "allow_postcopy", "preflight", "trace", "estimate", "link",
             "probe", "watch", "stall_timeout", "setup_timeout", "tls", "tls_authz", "copy_storage", "unplug", "replug")
_TO_HOST_ONLY = (("edit", "edit"), ("dry_run", "dry-run"), ("tunnel", "tunnel"), ("address", "address"),
                 ("run_dir", "dir"), ("name", "name"))


@dataclass(frozen=True)
class MigrateRequest:
    source: str
    uri: str | None = None
    dest: str | None = None                 # --to: an attached guest waiting with -incoming defer
    to_host: str | None = None              # --to-host: kvmshell starts the destination there
    estimate: bool = False
    strategy: str | None = None             # a strategy's name; None: the config's default
    downtime_ms: int | None = None
    bandwidth: int | None = None            # bytes/s
    link: int | None = None                 # bytes/s, for the model
    allow_postcopy: bool = False
    preflight: bool = False                 # auto measures the dirty rate first (live/preflight.py)
    watch: bool = False
    trace: str | None = None
    tls: str | None = None                  # the directory `tls-init` wrote
    tls_authz: bool = False
    stall_timeout: float | None = None
    setup_timeout: float | None = None
    probe: bool | None = None               # --probe True, --no-probe False, default None
    copy_storage: str | None = None         # all | inc
    insecure_storage: bool = False          # --copy-storage across hosts without --tls: the user accepts it
    unplug: tuple[str, ...] = ()
    replug: tuple[str, ...] = ()
    tunnel: bool = False
    address: str | None = None
    run_dir: str | None = None
    name: str | None = None
    edit: bool = False
    dry_run: bool = False
    yes: bool = False
    block: bool = False                     # -b
    inc: bool = False                       # -i
    resume: bool = False                    # -r
    detach: bool = False                    # -d (accepted; kvmshell never blocks the monitor)
    leave_to_qemu: bool = False             # --detach: -c/run do not follow it (steering and watchdog stop)
    persistent: bool = False                # libvirt guests: define the domain on the destination
    undefine_source: bool = False           # libvirt guests: undefine it on the source
    unsafe: bool = False                    # libvirt guests: shared storage libvirt cannot recognise
    p2p: bool = False                       # libvirt guests: the source's daemon reaches the destination's
    follow: bool = False                    # --follow: adopt the migration that runs (kvmshell did not start it here)

    # -- from a parsed line -------------------------------------------------------------------
    @classmethod
    def from_parsed(cls, source: str, values: Mapping[str, Any], flags: Mapping[str, Any]) -> MigrateRequest:
        """The request a `migrate` line's parsed values and flags describe (nothing checked yet)."""
        if flags.get("probe") and flags.get("no_probe"):
            raise UsageError("--probe and --no-probe exclude each other", guest=source)
        kw: dict[str, Any] = {"source": source, "uri": str(values["uri"]) if values.get("uri") else None}
        known = {f.name for f in fields(cls)}
        for flag, value in flags.items():
            name = _FIELD.get(flag, flag)
            if name in ("probe", "no_probe") or name not in known or value in (None, False, [], ()):
                continue
            kw[name] = tuple(str(v) for v in value) if name in ("unplug", "replug") else value
        kw["probe"] = True if flags.get("probe") else False if flags.get("no_probe") else None
        return cls(**kw)

    @property
    def mode(self) -> Mode:
        if self.follow:
            return Mode.FOLLOW
        if self.to_host is not None:
            return Mode.TO_HOST
        if self.estimate:
            return Mode.ESTIMATE
        return Mode.STEERED if self.steered else Mode.PLAIN

    @property
    def steered(self) -> bool:
        """Some option asks kvmshell to run the migration (a plain `migrate URI` is QEMU's own)."""
        return any(getattr(self, name) not in (None, False, ()) for name in _STEERING)

    # -- which options go together --------------------------------------------------------------
    def check(self) -> None:
        """UsageError for options that do not go together (the session's own checks - guests that
        exist, a running job, someone to ask - are the handler's)."""
        g = self.source
        if self.follow:
            others = [f.name for f in fields(self) if f.name not in ("source", "follow")
                      and getattr(self, f.name) not in (None, False, ())]
            if others:
                raise UsageError("--follow adopts the running migration as it is: drop "
                                 + ", ".join(_flag(name) for name in others), guest=g)
            return
        if self.insecure_storage and self.tls:
            raise UsageError("--insecure-storage is for a disk copy without --tls: with --tls the disks go in TLS; "
                             "drop one", guest=g)
        if self.leave_to_qemu:
            self._check_detach()
        if self.to_host is not None:
            self._check_to_host()
            return
        for name, flag in _TO_HOST_ONLY:
            if getattr(self, name):
                raise UsageError(f"--{flag} goes with --to-host (the destination kvmshell starts)", guest=g)

    def check_steered(self) -> None:
        """The checks of a migration kvmshell runs to an attached guest or a URI."""
        g = self.source
        if self.dest is not None and self.dest == g:
            raise UsageError("--to names the guest being migrated: pick the destination guest", guest=g)
        if self.dest is None and self.uri is None:
            raise UsageError("give a URI or --to DEST (an attached guest started with -incoming defer)", guest=g)
        if self.block or self.inc:
            raise UsageError("-b/-i (QEMU block migration) go with a plain `migrate -b URI`, not with --to or a "
                             "strategy", guest=g)
        if self.probe is not None and not self.estimate:
            raise UsageError("--probe/--no-probe go with --estimate (a migration uses --link or the config's link)",
                             guest=g)
        if self.estimate:
            if self.link is not None and self.probe:
                raise UsageError("--link gives the link's speed, --probe measures it: pick one", guest=g)
            return
        if self.tls and self.dest is None:
            raise UsageError("--tls needs --to DEST (kvmshell sets up both ends)", guest=g)
        if self.dest is not None and self.tls_authz and not self.tls:
            raise UsageError("--tls-authz goes with --tls DIR", guest=g)

    def _check_detach(self) -> None:
        g = self.source
        for name, flag, why in (("watch", "--watch", "follows it to its end"),
                                ("to_host", "--to-host", "quits the source at the end, and only kvmshell can"),
                                ("copy_storage", "--copy-storage", "completes the disk copy at the switch-over"),
                                ("unplug", "--unplug", "plugs the devices back at the end"),
                                ("replug", "--replug", "plugs the devices back at the end")):
            if getattr(self, name):
                raise UsageError(f"--detach leaves the migration to QEMU, but {flag}: kvmshell {why}; drop one",
                                 guest=g)

    def _check_to_host(self) -> None:
        g = self.source
        if self.dest is not None:
            raise UsageError("--to (an attached destination) and --to-host (one kvmshell starts) exclude each other",
                             guest=g)
        if self.uri is not None:
            raise UsageError("--to-host picks the URI itself: drop the URI", guest=g)
        for name, flag in (("block", "-b"), ("inc", "-i"), ("resume", "-r"), ("estimate", "--estimate")):
            if getattr(self, name):
                raise UsageError(f"{flag} does not go with --to-host", guest=g)
        if self.unplug or self.replug:
            raise UsageError("--unplug/--replug do not go with --to-host yet: device_del the device first, or "
                             "migrate to a destination you start (--to DEST)", guest=g)
        if self.tls_authz and not self.tls:
            raise UsageError("--tls-authz goes with --tls DIR", guest=g)
        if self.tls and self.tunnel:
            raise UsageError("--tls and --tunnel both encrypt the stream: pick one", guest=g)

    # -- back to a line -------------------------------------------------------------------------
    def line(self) -> str:
        """The `@SOURCE migrate ...` line that parses back into this request."""
        words = [f"@{self.source}", "migrate"]
        if self.follow:
            words.append("--follow")
        for name, flag in (("block", "-b"), ("inc", "-i"), ("resume", "-r"), ("detach", "-d")):
            if getattr(self, name):
                words.append(flag)
        opt = lambda flag, value: words.extend((flag, shlex.quote(str(value))))  # noqa: E731
        if self.dest is not None:
            opt("--to", self.dest)
        if self.to_host is not None:
            opt("--to-host", self.to_host)
        if self.estimate:
            words.append("--estimate")
        if self.strategy is not None:
            opt("--strategy", self.strategy)
        if self.bandwidth is not None:
            opt("--bandwidth", format_rate(self.bandwidth))
        if self.downtime_ms is not None:
            opt("--downtime", self.downtime_ms)
        if self.link is not None:
            opt("--link", format_rate(self.link))
        if self.allow_postcopy:
            words.append("--allow-postcopy")
        if self.preflight:
            words.append("--preflight")
        if self.copy_storage is not None:
            opt("--copy-storage", self.copy_storage)
        if self.tls is not None:
            opt("--tls", self.tls)
        if self.tls_authz:
            words.append("--tls-authz")
        if self.insecure_storage:
            words.append("--insecure-storage")
        if self.probe is not None:
            words.append("--probe" if self.probe else "--no-probe")
        if self.stall_timeout is not None:
            opt("--stall-timeout", f"{self.stall_timeout:g}")
        if self.setup_timeout is not None:
            opt("--setup-timeout", f"{self.setup_timeout:g}")
        if self.trace is not None:
            opt("--trace", self.trace)
        for dev in self.unplug:
            opt("--unplug", dev)
        for spec in self.replug:
            opt("--replug", spec)
        for name, flag in (("tunnel", "--tunnel"), ("edit", "--edit"), ("dry_run", "--dry-run"), ("yes", "--yes"),
                           ("watch", "--watch"), ("leave_to_qemu", "--detach"), ("persistent", "--persistent"),
                           ("undefine_source", "--undefine-source"), ("unsafe", "--unsafe"), ("p2p", "--p2p")):
            if getattr(self, name):
                words.append(flag)
        for name, flag in (("address", "--address"), ("run_dir", "--dir"), ("name", "--name")):
            if getattr(self, name) is not None:
                opt(flag, getattr(self, name))
        if self.uri is not None:
            words.append(shlex.quote(self.uri))
        return " ".join(words)


def _flag(name: str) -> str:
    """The option a request field comes from (``uri``: the URI)."""
    if name == "uri":
        return "the URI"
    flag = next((f for f, n in _FIELD.items() if n == name), name)
    return ("-" if len(flag) == 1 else "--") + flag.replace("_", "-")
