"""The interface every migration strategy implements, and the reasons to escalate they share."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from kvmshell.core.migration.model.predict import Prediction, Verdict
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import ParamValue

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.migration.live.request import MigrationRequest

THROTTLE_AFTER_S = 30.0                  # converging, but slower than this: throttle (auto, converge)


class Strategy:
    """How one migration starts and is steered. Subclasses set the class variables and override
    what differs; the job calls ``capabilities``/``parameters`` while it prepares both sides and
    ``on_sample`` on every sample while the migration is active."""

    name: ClassVar[str]                  # as typed after --strategy
    summary: ClassVar[str]               # one line, for help, completion and the dashboard's dialog
    rank: ClassVar[int] = 50             # where it is listed (lowest first: the default)
    offered: ClassVar[bool] = True       # False: used by kvmshell itself, not picked by a user
    steers: ClassVar[bool] = True        # False: observe only, set nothing on either side

    def __init__(self, request: MigrationRequest) -> None:
        self.request = request

    def postcopy(self) -> bool:
        """postcopy-ram on both sides before the start (the strategy may switch to postcopy)."""
        return False

    def converge(self) -> bool:
        """auto-converge (or dirty-limit, where the guest's QEMU has it) armed on the source."""
        return False

    def throttle_parameters(self, auto_converge: bool) -> dict[str, ParamValue]:
        """The cpu-throttle parameters to start with (``auto_converge``: the capability is on)."""
        return {}

    def throttles_from_start(self) -> bool:
        """With dirty-limit: hold the vCPUs back from the start (else the limit stays inert until the
        strategy arms it)."""
        return False

    def on_sample(self, job: MigrationJob, sample: Sample, prediction: Prediction) -> None:
        """Act on the model's latest prediction (the job's levers: ``start_postcopy``, ``arm_throttle``)."""


def escalation(job: MigrationJob, s: Sample, pred: Prediction, *, postcopy: bool) -> str | None:
    """Why pre-copy alone will not do, from the first full pass on: it will not converge, or it
    converges so slowly that escalating is better; None to go on as it is."""
    if s.pass_no < 2:
        return None
    slow = too_slow(job, s, pred, postcopy=postcopy)
    if pred.verdict is not Verdict.WILL_NOT_CONVERGE and slow is None:
        return None
    why = pred.reason if pred.verdict is Verdict.WILL_NOT_CONVERGE else slow
    return why or pred.reason


def too_slow(job: MigrationJob, s: Sample, pred: Prediction, *, postcopy: bool) -> str | None:
    """Converging, but so slowly that escalating is better (the reason), else None: with postcopy at
    hand, pre-copy taking more than twice what postcopy would; without, more than 30 s."""
    if pred.verdict is not Verdict.CONVERGES or pred.time_left_s is None:
        return None
    link = job.req.link or pred.rate or 0.0
    if postcopy and link > 0:
        postcopy_s = s.remaining / link + 0.5
        if pred.time_left_s > 2 * postcopy_s:
            return (f"pre-copy would need {pred.time_left_s:.1f} s more ({pred.reason}); "
                    f"postcopy about {postcopy_s:.1f} s")
        return None
    if pred.time_left_s > THROTTLE_AFTER_S:
        return f"pre-copy would need {pred.time_left_s:.0f} s more"
    return None
