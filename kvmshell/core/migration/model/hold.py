"""Holding a verdict: what a user is told is the model's verdict once it has held over a few samples and
a sync, not what the latest sample alone says (``predict.assess``). Pure, as the model.

A confident verdict not held yet is said as "uncertain" with its figures, or, where the samples just
before said the same verdict rough (the first sync's estimate), as that verdict still rough: the
evidence agrees with what was said, only not for long enough yet. Once held, a verdict stands against
samples that say otherwise until the other one holds in turn, or STICK_S pass without it said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from kvmshell.core.migration.model.predict import Prediction, Verdict, assess
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import MigrationStatus

# A confident verdict is said once it has HELD: HOLD_SAMPLES samples in a row after the first pass (none
# rough) saying it over HOLD_S seconds ("will not converge"; HOLD_CONVERGES_S for "will converge") and at
# least one sync; until then the prediction is UNCERTAIN (with its figures), or the same verdict rough when
# the samples just before said it rough. Once said it stands against samples that say otherwise (uncertain, rough or the
# other verdict) until the other verdict holds in turn, or STICK_S seconds pass without a sample saying it.
# Fitted on the corpus's fit set (bench/score_corpus.py --fit): fewest runs with a confident wrong verdict,
# then fewest verdict changes after the first pass, then the earliest right "will not converge".
HOLD_SAMPLES = 1
HOLD_S = 1.0                   # "will not converge" (the padded corpus's fit says 0.0: not applied, see RESULTS.md)
HOLD_CONVERGES_S = 3.0         # "will converge" (a bursty guest's passes can shrink for 2 s and grow again)
STICK_S = 5.0
HOLD_LOOKBACK = 40             # samples re-read for it (bounds the cost: ~20 s at 0.5 s a sample)
CONFIDENT = (Verdict.CONVERGES, Verdict.WILL_NOT_CONVERGE)


def assess_held(samples: Sequence[Sample], **limits: Any) -> Prediction:
    """``assess`` with its verdict held (``held``): what the latest sample says read against what the
    samples before it said. Same arguments as ``assess``. What a user is told; the strategies keep
    ``assess`` and their own hold (strategies/base.py ``Held``)."""
    now = assess(samples, **limits)
    if not _holdable(samples[-1] if samples else None, now):
        return now
    first = max(1, len(samples) - HOLD_LOOKBACK)
    return held([(samples[i - 1], assess(samples[:i], **limits)) for i in range(first, len(samples))]
                + [(samples[-1], now)])


def _holdable(s: Sample | None, p: Prediction) -> bool:
    """A prediction the hold applies to: during pre-copy after the first pass, not a finished run."""
    return (s is not None and s.pass_no >= 2 and s.status in (MigrationStatus.ACTIVE, MigrationStatus.PRE_SWITCHOVER)
            and p.verdict not in (Verdict.DONE, Verdict.UNKNOWN))


def _hold_s(v: Verdict) -> float:
    return HOLD_S if v is Verdict.WILL_NOT_CONVERGE else HOLD_CONVERGES_S


def held(history: Sequence[tuple[Sample, Prediction]]) -> Prediction:
    """What to say at the last of ``history`` [(sample, what that sample alone said), ...], oldest first."""
    s, now = history[-1]
    if not _holdable(s, now):
        return now
    kind: Verdict | None = None                   # the run of samples saying one confident verdict
    since = n = first_pass = 0
    said: tuple[Verdict, Prediction, float] | None = None    # the verdict that held: which, its prediction, last said
    lead: Verdict | None = None                   # a verdict said rough, and said since by every sample (rough or not)
    for si, p in history:
        k = p.verdict if p.verdict in CONFIDENT and not p.rough and _holdable(si, p) else None
        v = p.verdict if p.verdict in CONFIDENT and _holdable(si, p) else None
        lead = v if v is not None and (p.rough or v is lead) else None
        if k is not kind:
            kind, since, n, first_pass = k, si.t, 0, si.pass_no
        n += 1
        if said is not None and si.t - said[2] > STICK_S:
            said = None
        if k is not None and n >= HOLD_SAMPLES and si.t - since >= _hold_s(k) and si.pass_no > first_pass:
            said = (k, p, si.t)
        elif said is not None and k is said[0]:
            said = (k, p, si.t)
    if said is not None:
        if said[1] is now:
            return now
        v, p, t = said
        return replace(p, time_left_s=None if p.total_s is None else max(0.0, p.total_s - s.t),
                       reason=f"{p.reason} (held since it was said on enough samples; at {s.t:.1f} s: "
                              f"{now.verdict.value}{' (rough)' if now.rough else ''})")
    if now.verdict in CONFIDENT and not now.rough:
        span = s.t - since
        why = (f"{now.verdict.value} on {n} sample(s) over {span:.1f} s, not yet held ({HOLD_SAMPLES} over "
               f"{_hold_s(now.verdict):.1f} s and a sync)")
        if lead is now.verdict:                   # what was said rough, confirmed since: still said rough
            return replace(now, rough=True, reason=f"{why}, said rough before: {now.reason}")
        return replace(now, verdict=Verdict.UNCERTAIN, total_s=None, time_left_s=None,
                       total_range_s=None if now.total_s is None else (now.total_s, now.total_s),
                       reason=f"{why}: {now.reason}")
    return now
