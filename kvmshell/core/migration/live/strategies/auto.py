"""Pre-copy, escalating once the model's verdict holds that it will not converge (or too slowly): to
postcopy or a throttle chosen from the model, whichever costs the guest less (postcopy only if the user
allows it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import Strategy, escalation
from kvmshell.core.migration.model.predict import Prediction
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import ParamValue

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob


class Auto(Strategy):
    name = "auto"
    summary = "precopy, escalating to auto-converge (or postcopy if allowed and cheaper)"
    rank = 10

    def postcopy(self) -> bool:
        return self.request.allow_postcopy

    def converge(self) -> bool:
        return True                      # armed but inert (below): throttling stays a choice with postcopy too

    def throttle_parameters(self, auto_converge: bool) -> dict[str, ParamValue]:
        # armed but inert: QEMU may only throttle by 1 % until the model says it must converge
        return {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1} if auto_converge else {}

    def on_sample(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        if job.postcopy_started or job.throttle_armed:
            return                       # one escalation per migration
        step = escalation(self, job, sample, prediction, postcopy=self.postcopy())
        if step is None:
            return
        if step.lever == "postcopy":
            job.start_postcopy(step.why)
        else:
            job.arm_throttle(prediction, step.why)
