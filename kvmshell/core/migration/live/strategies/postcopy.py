"""Postcopy once the first full pass is done."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import Strategy
from kvmshell.core.migration.model.predict import Prediction
from kvmshell.core.migration.model.samples import Sample

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob


class Postcopy(Strategy):
    name = "postcopy"
    summary = "switch to postcopy after the first full pass"
    rank = 40

    def postcopy(self) -> bool:
        return True

    def on_sample(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        if sample.pass_no >= 2 and not job.postcopy_started:
            job.start_postcopy(f"the first full pass is done (pass {sample.pass_no} at {sample.t:.1f} s, "
                               f"{sample.remaining / 1e6:.0f} MB left)")
