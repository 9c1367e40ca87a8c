"""Pre-copy that throttles the guest once the model's verdict holds that it will not converge, or too slowly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import Strategy, escalation
from kvmshell.core.migration.model.predict import Prediction
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import ParamValue

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob


class Converge(Strategy):
    name = "converge"
    summary = "pre-copy with auto-converge steps chosen from the model"
    rank = 30

    def converge(self) -> bool:
        return True

    def throttle_parameters(self, auto_converge: bool) -> dict[str, ParamValue]:
        return {"cpu-throttle-initial": 30, "cpu-throttle-increment": 20, "max-cpu-throttle": 99}

    def throttles_from_start(self) -> bool:
        return True

    def on_sample(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        if job.throttle_armed:
            return
        step = escalation(self, job, sample, prediction, postcopy=False)
        if step is not None:
            job.arm_throttle(prediction, step.why)
