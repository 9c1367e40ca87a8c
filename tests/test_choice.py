"""The pre-flight choice (model/choice.py): which lever auto would use before the start, how sure it is
(the same verdict at both ends of the measured dirty-rate range), and that `--estimate`'s "auto would
run" line is the same choice with the request's --allow-postcopy and --bandwidth. Pure."""

from __future__ import annotations

import pytest

from kvmshell.core.migration.model.choice import (
    CONVERGE, LOW_END_TIE, MARGIN, POSTCOPY, POSTCOPY_START_S, PRECOPY, Choice, choose,
)
from kvmshell.core.migration.model.dirty import DirtyRange, Window, dirty_range
from kvmshell.core.migration.model.estimate import estimate
from kvmshell.core.migration.model.predict import ZERO_SCAN_RATE, Verdict

RAM = 512 << 20
# a working set of 16.8 MB re-dirtied within every window: 16.7 MB/s over 1 s, 5.6 MB/s over 3 s
HOT_WINDOWS = [Window(1, 16.7e6), Window(3, 5.6e6)]
# a guest whose dirtied bytes keep growing with the window: no working set, 50-60 MB/s
STREAM_WINDOWS = [Window(1, 60e6), Window(3, 50e6)]


def test_the_choice_reads_the_one_dirty_range_of_model_dirty() -> None:
    # the dirtied bytes stopped growing (16.7 MB in 1 s, 16.8 MB in 3 s): the whole set was re-dirtied
    # within 1 s, so at least ~16.7 MB/s (less QEMU's rounding to whole MiB/s), and no upper bound
    hot = dirty_range(HOT_WINDOWS, RAM)
    assert hot.lo == pytest.approx(16.7e6, rel=0.04) and hot.hi is None
    assert hot.working_set == pytest.approx(16.8e6)
    stream = dirty_range(STREAM_WINDOWS, RAM)
    assert stream.working_set is None and stream.lo <= 50e6 < 60e6 <= stream.hi
    with pytest.raises(ValueError):
        dirty_range([], RAM)


def test_a_confident_will_not_converge_goes_postcopy_at_once_when_allowed() -> None:
    # 4 MB/s against a working set of 17 MB re-dirtied faster than it moves: stuck at both ends
    c = choose(ram=64 << 20, dirty=dirty_range(HOT_WINDOWS, RAM), rate=4e6, link=None, downtime_limit_s=0.02,
               allow_postcopy=True)
    assert c.low.verdict is Verdict.WILL_NOT_CONVERGE and c.high.verdict is Verdict.WILL_NOT_CONVERGE
    assert (c.lever, c.at_once, c.confident) == (POSTCOPY, True, True)
    # the numbers: the verdict, the range, the rate and limit, each lever's cost
    text = c.numbers()
    assert text.startswith(f"will not converge (dirty rate {c.dirty.text()}, moving 4 MB/s, downtime limit 20 ms)"), text
    assert c.outcome is Verdict.WILL_NOT_CONVERGE
    assert "pre-copy at the low end: will not converge" in text
    assert "re-dirtying the working set faster still: will not converge" in text
    # postcopy at once: every page once (nothing sampled as zero here), the working set faulted in, the switch
    assert c.postcopy_s == pytest.approx((64 << 20) / 4e6 + POSTCOPY_START_S)
    assert c.postcopy is not None and c.postcopy.faulting_s == pytest.approx(16.8e6 / 4e6)
    assert (f"postcopy at once: {c.postcopy_s:.1f} s (67 MB of non-zero pages once + 0.3 s to switch), of which "
            "4.2 s with the guest faulting pages in, downtime ~10 ms; pre-copy: never") in text, text
    assert c.summary().startswith("postcopy at once: pre-copy will not converge (will not converge")


def test_without_postcopy_a_confident_will_not_converge_throttles_once_it_holds() -> None:
    c = choose(ram=64 << 20, dirty=dirty_range(HOT_WINDOWS, RAM), rate=4e6, link=None, downtime_limit_s=0.02,
               allow_postcopy=False)
    assert (c.lever, c.at_once, c.confident) == (CONVERGE, False, True)
    assert c.postcopy_s is None and "postcopy" not in c.summary()
    assert "throttled to" in c.numbers() and c.summary().startswith("converge: pre-copy, throttled once")


def test_ends_that_disagree_are_not_confident_and_nothing_is_done_at_once() -> None:
    # 50 MB/s converges on a 55 MB/s link, 60 MB/s does not: wait for a verdict that holds
    c = choose(ram=RAM, dirty=dirty_range(STREAM_WINDOWS, RAM), rate=55e6, link=None, downtime_limit_s=0.3,
               allow_postcopy=False)
    assert c.low.verdict is Verdict.CONVERGES and c.high.verdict is Verdict.WILL_NOT_CONVERGE
    assert (c.lever, c.at_once, c.confident) == (PRECOPY, False, False)
    assert c.numbers().startswith("uncertain: will converge at the low end, will not converge at the high end")
    assert c.outcome is Verdict.UNCERTAIN
    assert c.summary().startswith("precopy, escalating only if a verdict holds during the migration")
    # with postcopy allowed: it wins at the high end (never) and at the low end (17.5 s against 10.1 s)
    allowed = choose(ram=RAM, dirty=dirty_range(STREAM_WINDOWS, RAM), rate=55e6, link=None, downtime_limit_s=0.3,
                     allow_postcopy=True)
    assert (allowed.lever, allowed.at_once, allowed.confident) == (POSTCOPY, True, False)
    assert "pre-copy: 17.5 s or never (pre-copy / postcopy: 1.7x at the low end; " in allowed.summary()


def test_anything_but_a_verdict_at_both_ends_is_not_confident() -> None:
    # no rate known: the model says "too early to tell" (and any other verdict the model may add counts the same)
    c = choose(ram=RAM, dirty=DirtyRange(200e6, 200e6, None), rate=0.0, link=None, downtime_limit_s=0.3,
               allow_postcopy=True)
    assert c.low.verdict is Verdict.UNKNOWN
    assert (c.lever, c.at_once, c.confident) == (PRECOPY, False, False)


def test_a_confident_converge_is_plain_precopy_and_says_only_what_it_rests_on() -> None:
    c = choose(ram=RAM, dirty=DirtyRange(1e6, 2e6, None), rate=125e6, link=125e6, downtime_limit_s=0.3,
               allow_postcopy=True)
    assert (c.lever, c.at_once, c.confident) == (PRECOPY, False, True)
    assert c.summary().startswith("precopy: it converges at both ends of the range (will converge")
    assert c.outcome is Verdict.CONVERGES
    assert "throttled" not in c.summary()
    # postcopy allowed: its cost is weighed and said, against pre-copy's, though pre-copy wins
    assert "postcopy at once: " in c.summary() and "pre-copy / postcopy: " in c.summary()


def test_the_estimate_line_is_the_same_choice_with_the_requests_options() -> None:
    # the case: the estimate ignored --allow-postcopy and --bandwidth. Uncapped on 125 MB/s the
    # 17 MB working set converges at 17 MB/s, not if it is re-dirtied within a 0.13 s pass: not sure;
    # at --bandwidth 4M it surely does not: auto's line follows the cap auto will run with
    args = dict(ram=64 << 20, dirty_rate=16.7e6, working_set=16.8e6, link=125e6, cap=None, downtime_limit_s=0.02,
                dirty=dirty_range(HOT_WINDOWS, 64 << 20))
    assert estimate(**args, allow_postcopy=True).auto.startswith("precopy, escalating only if a verdict holds")
    capped = estimate(**args, allow_postcopy=True, bandwidth=4e6).auto
    assert capped == choose(ram=64 << 20, dirty=dirty_range(HOT_WINDOWS, 64 << 20), rate=4e6, link=125e6,
                            downtime_limit_s=0.02, allow_postcopy=True).summary()
    assert capped.startswith("postcopy at once: pre-copy will not converge") and "moving 4 MB/s" in capped
    assert estimate(**args, allow_postcopy=False, bandwidth=4e6).auto.startswith("converge:")
    # without a range (a single figure) the range is that figure
    one = estimate(**{**args, "dirty": None}, allow_postcopy=False, bandwidth=4e6).auto
    assert f"dirty rate {DirtyRange(16.7e6, 16.7e6, 16.8e6).text()}," in one       # the figure as given, bounded


# -- postcopy at once weighed by its cost against pre-copy's, not only when pre-copy is stuck ------------

GIB = 1 << 30
LINK = 125e6                     # 1 Gbit/s
SLOW = DirtyRange(90e6, 100e6, 200e6)          # a 200 MB set at 90-100 MB/s: pre-copy converges, slowly
CALM = DirtyRange(20e6, 30e6, 200e6)           # the same set at 20-30 MB/s: pre-copy converges soon


def weigh(dirty: DirtyRange, *, allow_postcopy: bool = True, zero_fraction: float = 0.6) -> Choice:
    return choose(ram=GIB, dirty=dirty, rate=LINK, link=LINK, downtime_limit_s=0.3, allow_postcopy=allow_postcopy,
                  zero_fraction=zero_fraction)


def test_postcopy_at_once_is_chosen_when_it_is_clearly_faster_though_precopy_converges() -> None:
    c = weigh(SLOW)
    assert c.low.verdict is c.high.verdict is Verdict.CONVERGES and c.confident
    assert (c.lever, c.at_once) == (POSTCOPY, True)
    # the non-zero 40 % of 1 GiB once at 125 MB/s, the zero pages scanned, the switch; the 200 MB set faulted in
    assert c.postcopy is not None
    assert c.postcopy.total_s == pytest.approx(0.4 * GIB / LINK + 0.6 * GIB / ZERO_SCAN_RATE + POSTCOPY_START_S)
    assert c.postcopy.faulting_s == pytest.approx(200e6 / LINK)
    assert c.low.total_s is not None and c.high.total_s is not None
    assert min(c.low.total_s, c.high.total_s) >= MARGIN * c.postcopy.total_s
    # the decision says the comparison in numbers
    text = c.summary()
    assert text.startswith("postcopy at once: 1.5x faster than pre-copy or more where the guest dirties most, no more "
                           "than 10 % slower where it dirties least ("), text
    assert (f"postcopy at once: {c.postcopy.total_s:.1f} s (429 MB of non-zero pages once + 0.3 s to switch), of "
            f"which 1.6 s with the guest faulting pages in, downtime ~10 ms; pre-copy: {c.low.total_s:.1f}-"
            f"{c.high.total_s:.1f} s (pre-copy / postcopy: {c.low.total_s / c.postcopy.total_s:.1f}x at the low end, "
            f"{c.high.total_s / c.postcopy.total_s:.1f}x at the high end; postcopy needs 1.5x at the high end, 0.91x at "
            "the low)") in text, text
    assert "60 % zero pages" in text


def test_precopy_is_kept_when_postcopy_is_faster_by_less_than_the_margin() -> None:
    c = weigh(CALM)
    assert c.postcopy is not None and c.low.total_s is not None and c.high.total_s is not None
    assert c.postcopy.total_s < c.low.total_s < c.high.total_s < MARGIN * c.postcopy.total_s   # faster, not clearly
    assert (c.lever, c.at_once) == (PRECOPY, False)
    assert c.summary().startswith("precopy: it converges at both ends of the range"), c.summary()
    assert "postcopy needs 1.5x at the high end" in c.summary()


def test_an_uncertain_range_takes_postcopy_where_it_wins_the_worst_case_and_ties_the_best() -> None:
    # no upper bound seen: pre-copy never converges at the high end, postcopy wins there
    slow_or_never = weigh(DirtyRange(90e6, None, 200e6))
    assert slow_or_never.outcome is Verdict.UNCERTAIN and slow_or_never.high.verdict is Verdict.WILL_NOT_CONVERGE
    assert slow_or_never.lever == POSTCOPY                    # slow at the low end too
    assert "pre-copy: " in slow_or_never.summary() and " or never (pre-copy / postcopy: " in slow_or_never.summary()
    # the lab bench's case: at the low end pre-copy is about as fast as postcopy, at the high end it never ends
    for lo in (45e6, 50e6, 55e6, 60e6):
        c = weigh(DirtyRange(lo, None, 200e6))
        assert c.postcopy is not None and c.low.total_s is not None
        tie = c.postcopy.total_s <= LOW_END_TIE * c.low.total_s
        assert c.lever == (POSTCOPY if tie else PRECOPY), (lo, c.summary())
    # a small guest, mostly zero pages, barely dirtying: pre-copy ends before postcopy's switch would
    soon_or_never = weigh(DirtyRange(1e6, None, 100e6), zero_fraction=0.99)
    assert soon_or_never.outcome is Verdict.UNCERTAIN
    assert soon_or_never.low.total_s is not None and soon_or_never.postcopy is not None
    assert soon_or_never.low.total_s * LOW_END_TIE < soon_or_never.postcopy.total_s   # pre-copy clearly faster there
    assert (soon_or_never.lever, soon_or_never.at_once) == (PRECOPY, False)
    assert soon_or_never.summary().startswith("precopy, escalating only if a verdict holds")


def test_zero_pages_are_scanned_not_sent_by_either() -> None:
    # the same guest counted with all its RAM sent: both take longer, the choice rests on the same figures
    full, sampled = weigh(SLOW, zero_fraction=0.0), weigh(SLOW)
    assert full.postcopy is not None and sampled.postcopy is not None
    assert full.postcopy.total_s == pytest.approx(GIB / LINK + POSTCOPY_START_S)
    assert sampled.postcopy.total_s < full.postcopy.total_s
    assert sampled.low.total_s is not None and full.low.total_s is not None
    assert sampled.low.total_s < full.low.total_s


def test_without_postcopy_allowed_nothing_is_weighed_and_the_levers_are_as_before() -> None:
    for dirty in (SLOW, CALM, DirtyRange(90e6, None, 200e6)):
        c = weigh(dirty, allow_postcopy=False)
        assert c.postcopy is None and c.lever == PRECOPY and not c.at_once
        assert "postcopy" not in c.summary()
    stuck = choose(ram=64 << 20, dirty=dirty_range(HOT_WINDOWS, RAM), rate=4e6, link=None, downtime_limit_s=0.02,
                   allow_postcopy=False)
    assert stuck.lever == CONVERGE
