"""Fit the model's constants on the FIT runs of the trace corpus only (never the held-out ones), for
``bench/score_corpus.py --fit``: each fit prints its grid as Markdown for bench/RESULTS.md and the value
it would choose; the constants in the model are set by hand from these tables."""

from __future__ import annotations

import statistics

from score_corpus import (
    STEADY, UNSTEERED, Run, after_first_sync, changes_after_first_pass, confident_wrong, dirty_model, errors,
    first_will_not, fmt, hold, model, pct, point_at, preflight, preflight_range_figures, replay, retractions,
    verdict_changes, verdicts_replaced,
)

from kvmshell.core.migration.live.strategies import base as strategies_base
from kvmshell.core.values.models import MigrationStatus


def fit_all(runs: list[Run]) -> list[str]:
    return (fit_later_passes(runs) + [""] + fit_hold(runs) + [""] + fit_migrating_share(runs) + [""]
            + fit_pass_spread(runs) + [""] + fit_verdict_hold(runs) + [""] + fit_first_pass(runs) + [""]
            + fit_first_pass_syncs(runs) + [""] + fit_unbound_point(runs))


def fit_later_passes(runs: list[Run]) -> list[str]:
    """LATER_PASSES only acts between the first sync and the third: scored on the first prediction
    after the first sync (at 25 % of the elapsed time most runs are still in their first pass)."""
    saved = model.LATER_PASSES
    rows = []
    try:
        for v in [round(0.85 + 0.01 * i, 2) for i in range(26)]:
            model.LATER_PASSES = v
            e = errors(runs, after_first_sync)
            rows.append((v, pct(e.total, .5), pct(e.total, .9), len(e.total)))
    finally:
        model.LATER_PASSES = saved
    scored = [r for r in rows if r[2] is not None]
    out = ["| LATER_PASSES | p50 abs error after the first sync | p90 | runs |", "|---|---|---|---|"]
    out += [f"| {v} | {fmt(a, '%', 1)} | {fmt(b, '%', 1)} | {n} |" for v, a, b, n in rows if v in (0.9, 0.95, 0.97, 1.0, 1.05)
            or (scored and v == min(scored, key=lambda r: (r[2], r[1]))[0])]
    if scored:
        best = min(scored, key=lambda r: (r[2], r[1]))
        out.append(f"\nLATER_PASSES fitted on {best[3]} fit runs (least p90 |error| after the first sync): {best[0]} "
                   f"(p50 {best[1]:.1f} %, p90 {best[2]:.1f} %; now {saved}).")
    return out


def escalation(run: Run, samples: int, seconds: float) -> float | None:
    """When a verdict that holds (``samples`` over ``seconds`` and a new pass) would escalate."""
    held = None
    for s, p in replay(run):
        held = strategies_base.evidence(held, strategies_base.verdict_of(s, p), s)
        if held and held.samples >= samples and held.until - held.since >= seconds and held.last_pass > held.first_pass:
            return s.t
    return None


def fit_hold(runs: list[Run]) -> list[str]:
    runs = [r for r in runs if r.policy in UNSTEERED]
    results = []
    for n in range(1, 9):
        for sec in [0.25 * i for i in range(13)]:
            false = late = 0
            times = []
            for r in runs:
                t = escalation(r, n, sec)
                if r.completed and t is not None:
                    false += 1
                elif not r.completed:
                    if t is None:
                        late += 1
                    else:
                        times.append(t)
            results.append((false, late, statistics.mean(times) if times else float("inf"), n, sec))
    best = min(results, key=lambda x: (x[0], x[1], x[2], x[3], x[4]))
    clean = [x for x in results if x[0] == 0 and x[1] == 0]
    region = (f"; 0 false and 0 missed for HOLD_S {min(x[4] for x in clean if x[3] == 3)}-"
              f"{max(x[4] for x in clean if x[3] == 3)} s at HOLD_SAMPLES 3, HOLD_SAMPLES "
              f"{min(x[3] for x in clean)}-{max(x[3] for x in clean)} at some HOLD_S"
              if any(x[3] == 3 for x in clean) else "; no setting without a false or missed escalation")
    now = next(x for x in results if x[3] == strategies_base.HOLD_SAMPLES and x[4] == strategies_base.HOLD_S)
    stuck = sum(not r.completed for r in runs)
    return [f"HOLD fitted on {len(runs)} unsteered fit runs ({stuck} not completed): HOLD_SAMPLES = {best[3]}, "
            f"HOLD_S = {best[4]}: {best[0]} false escalations, {best[1]} missed, mean escalation at "
            f"{best[2]:.1f} s; now ({strategies_base.HOLD_SAMPLES}, {strategies_base.HOLD_S}): {now[0]} false, "
            f"{now[1]} missed, mean {now[2]:.1f} s{region}."]


def confident_wrong_runs(runs: list[Run]) -> int:
    return sum(1 for r in runs if r.policy in UNSTEERED and confident_wrong(r))


def preflight_wrong(run: Run) -> bool:
    p = preflight(run, True)
    if p is None or run.policy not in UNSTEERED:
        return False
    return (p.verdict is model.Verdict.CONVERGES and not run.completed) or (
        p.verdict is model.Verdict.WILL_NOT_CONVERGE and run.completed)


def fit_migrating_share(runs: list[Run]) -> list[str]:
    """MIGRATING_SHARE (the low end of the pre-flight range while migrating): fewest confident wrong
    pre-flight verdicts on the unsteered fit runs, then the least p90 |error| of the total time."""
    if dirty_model is None:
        return []
    saved, rows = dirty_model.MIGRATING_SHARE, []
    try:
        for v in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            dirty_model.MIGRATING_SHARE = v
            e = errors(runs, lambda r: preflight(r, True))
            rows.append((v, sum(preflight_wrong(r) for r in runs), pct(e.total, .5), pct(e.total, .9), len(e.total)))
    finally:
        dirty_model.MIGRATING_SHARE = saved
    key = lambda r: (r[1], r[3] if r[3] is not None else 1e9)   # noqa: E731
    best = min(rows, key=key)
    tied = [r[0] for r in rows if key(r) == key(best)]
    out = ["| MIGRATING_SHARE | confident wrong pre-flight verdicts (unsteered) | p50 / p90 abs error of the total | "
           "runs with a time |", "|---|---|---|---|"]
    out += [f"| {v} | {w} | {fmt(a)} / {fmt(b)} | {n} |" for v, w, a, b, n in rows]
    out.append(f"\nMIGRATING_SHARE on {len(runs)} fit runs: " + (
        f"{best[0]} (now {saved})." if len(tied) == 1 else
        f"{min(tied)}-{max(tied)} score the same ({best[1]} wrong, p90 {fmt(best[3])}): the fit set cannot pin it "
        f"down; {saved} stays" + (" (inside that range)." if min(tied) <= saved <= max(tied) else ".")))
    return out


def fit_pass_spread(runs: list[Run]) -> list[str]:
    """PASS_SPREAD (how far the rate read from the passes is widened): fewest unsteered runs with a
    confident wrong verdict, then the fewest verdict changes after 3 s, then the least p90 after the first sync."""
    saved, rows = model.PASS_SPREAD, []
    try:
        for v in (1.0, 1.25, 1.5, 2.0, 3.0, 4.0):
            model.PASS_SPREAD = v
            e = errors(runs, after_first_sync)
            rows.append((v, confident_wrong_runs(runs), sum(verdict_changes(r) > 0 for r in runs),
                         pct(e.total, .9), len(e.total)))
    finally:
        model.PASS_SPREAD = saved
    best = min(rows, key=lambda r: (r[1], r[2], r[3] if r[3] is not None else 1e9))
    out = ["| PASS_SPREAD | runs with a confident wrong verdict (unsteered) | runs whose verdict changes after 3 s | "
           "p90 abs error after the first sync | runs with a time |", "|---|---|---|---|---|"]
    out += [f"| {v} | {w} | {c} | {fmt(b)} | {n} |" for v, w, c, b, n in rows]
    out.append(f"\nPASS_SPREAD fitted on {len(runs)} fit runs: {best[0]} (now {saved}).")
    return out


def fit_verdict_hold(runs: list[Run]) -> list[str]:
    """HOLD_SAMPLES, HOLD_S, HOLD_CONVERGES_S, STICK_S (hold.held): fewest unsteered runs with a confident wrong verdict,
    then fewest steady runs whose verdict changes after the first pass, then fewest that take one back, then
    the earliest right "will not converge" (mean over the unsteered runs that did not complete; never said counts as the 30 s cap)."""
    saved = (hold.HOLD_SAMPLES, hold.HOLD_S, hold.HOLD_CONVERGES_S, hold.STICK_S)
    unsteered = [r for r in runs if r.policy in UNSTEERED]
    steady = [r for r in runs if r.row.get("work") in STEADY]
    stuck = [r for r in unsteered if not r.completed]
    rows = []
    try:
        for n in (1, 2, 3):
            for sec in (0.0, 0.5, 1.0, 2.0, 3.0):
                for conv in (0.0, 1.0, 2.0, 3.0):
                    for stick in (0.0, 2.0, 5.0, 10.0):
                        hold.HOLD_SAMPLES, hold.HOLD_S, hold.HOLD_CONVERGES_S, hold.STICK_S = n, sec, conv, stick
                        firsts = [first_will_not(r) for r in stuck]
                        rows.append((sum(bool(confident_wrong(r)) for r in unsteered),
                                     sum(changes_after_first_pass(r) > 0 for r in steady),
                                     sum(retractions(r) > 0 for r in steady),
                                     statistics.mean(t if t is not None else 30.0 for t in firsts) if firsts else 0.0,
                                     n, sec, conv, stick))
    finally:
        hold.HOLD_SAMPLES, hold.HOLD_S, hold.HOLD_CONVERGES_S, hold.STICK_S = saved
    key = lambda r: (r[0], r[1], r[2], r[3])          # noqa: E731
    best = min(rows, key=key)
    now = next(r for r in rows if r[4:] == saved)
    # the best setting at each count of wrong runs: what holding longer buys and costs
    show = [min((r for r in rows if r[0] == w), key=key) for w in sorted({r[0] for r in rows})]
    show += [r for r in rows if r[4:] in (saved, (1, 0.0, 0.0, 0.0))]
    out = ["| HOLD_SAMPLES | HOLD_S | HOLD_CONVERGES_S | STICK_S | runs with a confident wrong verdict (unsteered) | steady runs whose "
           "verdict changes after the first pass | steady runs with a verdict taken back | mean first right "
           "\"will not converge\" |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {n} | {sec} | {conv} | {stick} | {w} | {c} | {b} | {t:.1f} s |" for w, c, b, t, n, sec, conv, stick in show]
    out.append(f"\nHold fitted on {len(runs)} fit runs ({len(unsteered)} unsteered, {len(stuck)} of them not completed; "
               f"{len(steady)} steady): HOLD_SAMPLES = {best[4]}, HOLD_S = {best[5]}, HOLD_CONVERGES_S = {best[6]}, STICK_S = {best[7]} "
               f"({best[0]} wrong, {best[1]} changed, {best[2]} taken back, first right WNC {best[3]:.1f} s); now "
               f"{saved}: {now[0]} wrong, {now[1]} changed, {now[2]} taken back, {now[3]:.1f} s. The last rows: the constants now, and the lightest hold (1 sample, any new pass).")
    return out


def held_at(run: Run, fraction: float) -> model.Prediction | None:
    """What ``assess_held`` says at ``fraction`` of the elapsed time, the pre-flight range and zero pages
    passed (``at_fraction(run, fraction, "range")`` without replaying the whole run: the fits try many constants)."""
    limit, cap, link = run.limits()
    ss = [s for s in run.trace.samples if s.t <= fraction * run.elapsed and s.status is not MigrationStatus.COMPLETED]
    if not ss:
        return None
    extra = preflight_range_figures(run)
    first = max(1, len(ss) - hold.HOLD_LOOKBACK)
    return hold.held([(ss[i - 1], model.assess(ss[:i], downtime_limit_s=limit, bandwidth_cap=cap, link=link, **extra))
                      for i in range(first, len(ss) + 1)])


def fit_first_pass(runs: list[Run]) -> list[str]:
    """ZERO_SCAN_RATE, RATE_POINT and RATE_LO (predict.first_pass): the most outcomes inside their range at
    25 % of the elapsed time (pre-flight range + zero pages passed; every completed fit run), then the least
    p50 |error| of the time in the range (the width ignored); then TIGHT: the widest range (high / low)
    whose times keep p90 |error| <= 20 % both at 25 % and at 50 % of the elapsed time (a moment that gives
    none passes), over 10 runs or more in all."""
    saved = (model.ZERO_SCAN_RATE, model.RATE_POINT, model.RATE_LO, model.TIGHT)
    done = [r for r in runs if r.completed and r.total_s]
    rows, widths = [], []
    try:
        model.TIGHT = float("inf")
        for zs in (2e9, 5e9, 1e10, 3e10):
            for rp in (0.8, 0.85, 0.9, 0.95, 1.0):
                for lo in (0.6, 0.75):
                    model.ZERO_SCAN_RATE, model.RATE_POINT, model.RATE_LO = zs, rp, lo
                    got = [(r, p) for r in done if (p := held_at(r, 0.25)) is not None
                           and p.total_s is not None and p.total_range_s]
                    err = [abs(p.total_s - r.total_s) / r.total_s * 100 for r, p in got]
                    inside = sum(p.total_range_s[0] * 0.999 <= r.total_s <= p.total_range_s[1] * 1.001 for r, p in got)
                    rows.append((-inside, pct(err, .5) or 1e9, zs, rp, lo, pct(err, .9), len(got)))
        best = min(rows)
        model.ZERO_SCAN_RATE, model.RATE_POINT, model.RATE_LO = best[2], best[3], best[4]
        for fraction in (0.25, 0.5):
            got = [(p.total_range_s[1] / p.total_range_s[0], abs(p.total_s - r.total_s) / r.total_s * 100) for r in done
                   if (p := held_at(r, fraction)) is not None and p.total_s is not None and p.total_range_s
                   and p.total_range_s[0] > 0]
            for tight in (1.1, 1.2, 1.3, 1.5, 2.0, 2.5, 3.0, 4.0):
                err = [e for w, e in got if w <= tight]
                widths.append((fraction, tight, len(err), pct(err, .5), pct(err, .9)))
    finally:
        model.ZERO_SCAN_RATE, model.RATE_POINT, model.RATE_LO, model.TIGHT = saved
    out = ["| ZERO_SCAN_RATE | RATE_POINT | RATE_LO | p50 / p90 abs error at 25 % (range ignored) | outcomes inside the range "
           "| runs |", "|---|---|---|---|---|---|"]
    out += [f"| {zs:.0e} | {rp} | {lo} | {fmt(a)} / {fmt(b)} | {-i} | {n} |" for i, a, zs, rp, lo, b, n in sorted(rows)[:6]]
    out += ["", "| moment | TIGHT (range high / low at most) | runs with a time | p50 / p90 abs error |", "|---|---|---|---|"]
    out += [f"| {100 * f:.0f} % | {t} | {n} | {fmt(a)} / {fmt(b)} |" for f, t, n, a, b in widths]
    # TIGHT: the widest whose times keep p90 <= 20 % at every moment that gives any, over 10 runs or more in all
    fine = [t for t in sorted({w[1] for w in widths})
            if all(b is None or b <= 20 for f, u, n, a, b in widths if u == t)
            and sum(n for f, u, n, a, b in widths if u == t) >= 10]
    out.append(f"\nFirst pass fitted on {len(done)} completed fit runs: ZERO_SCAN_RATE = {best[2]:.0e} B/s, RATE_POINT = "
               f"{best[3]}, RATE_LO = {best[4]} (now {saved[0]:.0e}, {saved[1]}, {saved[2]}); TIGHT: "
               + (f"{max(fine)}" if fine else "no width keeps p90 <= 20 % over 10 runs or more") + f" (now {saved[3]}).")
    return out


def fit_first_pass_syncs(runs: list[Run]) -> list[str]:
    """FIRST_PASS_SYNCS (until how many syncs the rough rate is the first pass's own rate of non-zero pages, 0:
    never): fewest unsteered runs with a confident wrong verdict, then fewest steady runs (every policy) that
    replace a verdict said after the first pass, then fewest that change, then the least p90 after the first sync."""
    saved, rows = model.FIRST_PASS_SYNCS, []
    steady = [r for r in runs if r.row.get("work") in STEADY]
    try:
        for v in (0.0, 2.0, 3.0, 4.0, 6.0):
            model.FIRST_PASS_SYNCS = v
            e = errors(runs, after_first_sync)
            rows.append((confident_wrong_runs(runs), sum(verdicts_replaced(r) > 0 for r in steady),
                         sum(changes_after_first_pass(r) > 0 for r in steady), pct(e.total, .9) or 1e9, v,
                         pct(e.total, .5), pct(e.down, .5), len(e.total)))
    finally:
        model.FIRST_PASS_SYNCS = saved
    best = min(rows)
    tied = [r[4] for r in rows if r[:4] == best[:4]]
    out = ["| FIRST_PASS_SYNCS | runs with a confident wrong verdict (unsteered) | steady runs replacing a verdict | "
           "steady runs changing | total time p50 / p90 abs error after the first sync | downtime p50 | runs with a time |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {v} | {w} | {rep} | {c} | {fmt(a)} / {fmt(b)} | {fmt(d)} | {n} |" for w, rep, c, b, v, a, d, n in rows]
    out.append(f"\nFIRST_PASS_SYNCS fitted on {len(runs)} fit runs ({len(steady)} steady): {best[4]}"
               + (f" (ties: {', '.join(map(str, tied))})" if len(tied) > 1 else "") + f" (now {saved}).")
    return out


def fit_unbound_point(runs: list[Run]) -> list[str]:
    """UNBOUND_POINT (the first pass's rate at the point when nothing bounds it and it is not measured yet, a
    share of the samples' throughput): the least p90 |error| of the point at 25 % of the elapsed time (the
    range's width ignored: ``point_at``), then at 50 %; the confident wrong verdicts (unsteered) shown."""
    saved, rows = model.UNBOUND_POINT, []
    done = [r for r in runs if r.completed and r.total_s]
    try:
        for v in (0.3, 0.4, 0.5, 0.6, 0.8, 1.0):
            model.UNBOUND_POINT = v
            e = [[abs(p.total_s - r.total_s) / r.total_s * 100 for r in done
                  if (p := point_at(r, f)) is not None and p.total_s is not None] for f in (0.25, 0.5)]
            rows.append((pct(e[0], .9) or 1e9, pct(e[1], .9) or 1e9, v, pct(e[0], .5), len(e[0]), pct(e[1], .5),
                         len(e[1]), confident_wrong_runs(runs)))
    finally:
        model.UNBOUND_POINT = saved
    best = min(rows)
    out = ["| UNBOUND_POINT | point at 25 %: p50 / p90 abs error (runs) | at 50 % | runs with a confident wrong verdict (unsteered) |",
           "|---|---|---|---|"]
    out += [f"| {v} | {fmt(a50)} / {fmt(a90)} ({n25}) | {fmt(b50)} / {fmt(b90)} ({n50}) | {w} |"
            for a90, b90, v, a50, n25, b50, n50, w in rows]
    out.append(f"\nUNBOUND_POINT fitted on {len(done)} completed fit runs: {best[2]} (now {saved}).")
    return out
