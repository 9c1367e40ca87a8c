"""Pre-copy, escalating once the model's verdict holds that it will not converge (or too slowly): to
postcopy or a throttle chosen from the model, whichever costs the guest less (postcopy only if the user
allows it). With the pre-flight (``live/preflight.py``) auto makes one choice before the start
(model/choice.py ``pick``) among plain pre-copy, each fewer-bytes option the guest's QEMU has (multifd,
compression, XBZRLE, model/wire.py) and, with postcopy allowed, postcopy at once: the fastest whose
predicted guest-visible stall fits the downtime limit (postcopy at once: the high end of its predicted
stall, the guest waiting on pages faulted in over the link), else the least stall that converges.
Postcopy at once starts on the first sample of the running migration (QEMU takes migrate-start-postcopy
right after `migrate`); a multifd option leaves postcopy out (QEMU 7.2 has no postcopy over multifd),
postcopy after pre-copy stays the escalation lever otherwise. Without postcopy, where the pre-flight
says plain pre-copy may not converge (or only slowly, by the slow rule) and a throttle would converge,
auto-converge is armed at that throttle from the start (model/choice.py ``throttle_from_start``): QEMU
applies it at the earliest sync it can, and only if the guest keeps dirtying. A throttle is released once
it holds that pre-copy would converge without it; after that auto throttles no more (no flip-flop),
and may still switch to postcopy. A throttle QEMU has applied, under which "will not converge" holds
again, is raised to the model's throttle for what the guest still dirties (``MigrationJob.raise_throttle``)
where that is more than QEMU's own next step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import WILL_NOT, Held, Strategy, escalation, evidence, release, verdict_of
from kvmshell.core.migration.model.choice import Choice, cheapest
from kvmshell.core.migration.model.predict import MAX_THROTTLE, Prediction
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.migration.model.wire import PLAIN, WireCost, WireOption, why
from kvmshell.core.values.models import ParamValue

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.migration.live.request import MigrationRequest


class Auto(Strategy):
    name = "auto"
    summary = "precopy, escalating to auto-converge (or postcopy if allowed and cheaper)"
    rank = 10
    uses_preflight = True

    def __init__(self, request: MigrationRequest) -> None:
        super().__init__(request)
        self.preflight_said = False
        self.released = False            # the throttle was released: it is not armed again
        self.wire = PLAIN                # the fewer-bytes option chosen before the start (with the pre-flight)
        self.from_start: Choice | None = None   # the pre-flight's choice, when it arms the throttle before the start
        self.stuck: Held | None = None   # "will not converge" under the throttle QEMU applied

    def postcopy(self) -> bool:
        # QEMU 7.2 sends postcopy's pages on the main stream only: no postcopy over multifd
        return self.request.allow_postcopy and not self.wire.capabilities.get("multifd")

    def wants_wire_data(self, request: MigrationRequest) -> bool:
        return request.preflight

    def wire_option(self, costs: Sequence[WireCost] | None, downtime_s: float,
                    choice: Choice | None = None) -> tuple[WireOption, str | None]:
        if choice is not None:                   # the pre-flight weighed every option, postcopy at once too
            self.wire = choice.wire
            self.from_start = choice if choice.from_start is not None else None   # (never with postcopy allowed)
            each = "; ".join(c.line() for c in costs or ())
            return self.wire, "; ".join(x for x in (choice.picked, each) if x) or None
        if costs is None:
            return PLAIN, None
        if not (self.request.bandwidth or self.request.link):
            return PLAIN, "plain pre-copy: the link's speed is not known (--link or --bandwidth), no option can be costed"
        left_out = ""
        if self.request.allow_postcopy:          # no pre-flight choice: keep postcopy as the escalation lever
            left_out = ("; multifd and compression left out: --allow-postcopy keeps postcopy, which QEMU does not "
                        "run over multifd")
            costs = [c for c in costs if not c.option.capabilities.get("multifd")]
        chosen = cheapest(costs, downtime_s)
        self.wire = chosen.option if chosen is not None else PLAIN
        return self.wire, why(chosen, costs, downtime_s) + left_out

    def converge(self) -> bool:
        return True                      # armed but inert (below): throttling stays a choice with postcopy too

    def throttle_parameters(self, auto_converge: bool) -> dict[str, ParamValue]:
        if not auto_converge:
            return {}
        if self.from_start is not None and not self.released:
            return {"cpu-throttle-initial": percent(self.from_start), "cpu-throttle-increment": 10,
                    "max-cpu-throttle": MAX_THROTTLE}
        # armed but inert: QEMU may only throttle by 1 % until the model says it must converge
        return {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}

    def on_sample(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        if job.postcopy_started:
            return
        pre = job.preflight
        if pre is not None and not self.preflight_said:
            self.preflight_said = True
            job.decide("preflight", pre.said())
        if pre is not None and pre.choice is not None and pre.choice.at_once and self.postcopy():
            job.start_postcopy(f"the pre-flight chose postcopy at once (pass {sample.pass_no} at {sample.t:.1f} s, "
                               f"{sample.transferred / 1e6:.0f} MB sent): {pre.choice.numbers()}")
            return
        if self.from_start is not None and not job.throttle_armed and not self.released:
            job.throttle_armed = True
            p = job.throttle_target = percent(self.from_start)
            job.decide("throttle", f"{self.from_start.from_start}; auto-converge armed from the start at {p} % "
                                   f"(then +10 % a pass): QEMU applies it at its second sync where the guest dirtied "
                                   f"over half of what was sent, not before", target=p)
        if job.throttle_armed and sample.cpu_throttle == 0 and sample.pass_no >= 2 and prediction.dirty_rate:
            self.armed_rate = prediction.dirty_rate      # armed from the start: QEMU's rate before it applies it
        if job.throttle_armed:
            why = release(self, job, sample, prediction)
            if why is not None:
                self.released = True
                self.held = None
                job.release_throttle(why)
            else:
                self.raise_if_stuck(job, sample, prediction)
            return
        step = escalation(self, job, sample, prediction, postcopy=self.postcopy())
        if step is None or (step.lever == "throttle" and self.released):
            return
        if step.lever == "postcopy":
            job.start_postcopy(step.why)
        else:
            self.armed_rate = prediction.dirty_rate
            job.arm_throttle(prediction, step.why)


    def raise_if_stuck(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        """Once QEMU applies the throttle asked for and "will not converge" still holds, raise it. On the
        2 GiB Linux guest under TCG (bench s16) the guest re-dirtied its whole 536 MB set every pass at 41 to
        81 %, while QEMU went up by 10 % every second sync: 91 % came at 74 s."""
        applied = sample.cpu_throttle
        under = 0 < job.throttle_target <= applied < MAX_THROTTLE
        self.stuck = evidence(self.stuck, WILL_NOT if under and verdict_of(sample, prediction) == WILL_NOT else None,
                              sample)
        if self.stuck is not None and self.stuck.holds:
            held, self.stuck = self.stuck, None
            job.raise_throttle(prediction, applied, f"{prediction.reason} at {applied} % ({held.said()})")



def percent(choice: Choice) -> int:
    """The pre-flight's throttle armed from the start, as cpu-throttle-initial."""
    return round(100 * choice.start_throttle)
