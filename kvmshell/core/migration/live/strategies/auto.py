"""Pre-copy, escalating when the model says it will not converge (or too slowly): to postcopy if the
user allows it, else to a throttle chosen from the model."""

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
    summary = "precopy, escalating to auto-converge (or postcopy if allowed)"
    rank = 10

    def postcopy(self) -> bool:
        return self.request.allow_postcopy

    def converge(self) -> bool:
        return not self.request.allow_postcopy

    def throttle_parameters(self, auto_converge: bool) -> dict[str, ParamValue]:
        # armed but inert: QEMU may only throttle by 1 % until the model says it must converge
        return {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1} if auto_converge else {}

    def on_sample(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        why = escalation(job, sample, prediction, postcopy=self.postcopy())
        if why is None:
            return
        if self.postcopy():
            if not job.postcopy_started:
                job.start_postcopy(why)
        elif not job.throttle_armed:
            job.arm_throttle(prediction, why)
