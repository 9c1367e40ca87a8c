"""Score the CURRENT model on the held-out runs of the trace corpus (bench/corpus.py), or fit its
constants on the fit runs only.

Every held-out trace is replayed sample by sample through ``assess_held`` (``assess``, its verdict held), and its
header's pre-flight (calc-dirty-rate over 1 s and 3 s) through ``estimate_working_set`` and ``estimate``.
Prints Markdown for bench/RESULTS.md: the corpus per cell; p50/p90 |error| of the predicted total time and
downtime at the start (pre-flight) and at 25 % of the elapsed time; the verdict confusion matrix against
the outcome (completed within the cap or not; unsteered policies only); the time to the first right
"will not converge"; how often the verdict changes after the first 3 s.

    .venv/bin/python bench/score_corpus.py [--corpus bench/corpus] [--set held-out|fit|all] [--since 2026-12-03T19:00]
    .venv/bin/python bench/score_corpus.py --fit      # the model's constants on the fit set (bench/fit_corpus.py)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmshell.core.migration.model import hold
from kvmshell.core.migration.model import predict as model
from kvmshell.core.migration.model.estimate import estimate

try:                                   # the dirty rate as a range (the measure branch)
    from kvmshell.core.migration.model import dirty as dirty_model
except ImportError:
    dirty_model = None                 # type: ignore[assignment]
from kvmshell.core.migration.model.samples import Sample, Trace, read_trace
from kvmshell.core.values.models import MigrationStatus

CORPUS = Path(__file__).with_name("corpus")
HELD_OUT_BELOW = 77           # as bench/corpus.py: sha256(run id) first byte below this: held out
UNSTEERED = ("defaults", "precopy")
NO_CAP = 1e10                 # a max-bandwidth above this is kvmshell's "uncapped"
ESTIMATE_OPTION = {"defaults": "precopy (current limits)", "precopy": "precopy, uncapped"}
AUTO_OPTION = {"precopy, uncapped": "precopy, uncapped", "converge": "converge (auto-converge)"}


def held_out(run_id: str) -> bool:
    return hashlib.sha256(run_id.encode()).digest()[0] < HELD_OUT_BELOW


@dataclass
class Run:
    """One recorded run: its index line, its trace and the raw header (with the pre-flight)."""
    row: dict[str, Any]
    trace: Trace
    header: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.row["run_id"])

    @property
    def policy(self) -> str:
        return str(self.row["policy"])

    @property
    def completed(self) -> bool:
        return bool(self.row.get("completed"))

    @property
    def total_s(self) -> float | None:
        return self.row.get("total_s")

    @property
    def downtime_ms(self) -> float | None:
        return self.row.get("downtime_ms")

    @property
    def elapsed(self) -> float:
        """Seconds the migration ran: its total time, else the last sample's time."""
        if self.total_s:
            return float(self.total_s)
        return self.trace.samples[-1].t if self.trace.samples else 0.0

    def limits(self) -> tuple[float, float | None, float | None]:
        """(downtime limit s, bandwidth cap, link) as the job had them."""
        params = self.trace.header.params
        cap = params.get("max-bandwidth")
        return (params.get("downtime-limit", 300) / 1000, float(cap) if cap and cap < NO_CAP else None,
                self.trace.header.link_bytes_per_s)


def load_trace_gz(path: Path) -> tuple[Trace, dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return read_trace(lines, str(path)), json.loads(lines[0])


def index(corpus: Path, since: str | None = None) -> list[dict[str, Any]]:
    """The latest index line of every run id (with ``since``, an ISO date and time in UTC: only the runs
    recorded then or later, by the line's "date")."""
    rows: dict[str, dict[str, Any]] = {}
    path = corpus / "INDEX.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                rows[d["run_id"]] = d
    return [r for r in rows.values() if since is None or str(r.get("date", "")) >= since]


def load_runs(corpus: Path, which: str, since: str | None = None) -> list[Run]:
    runs = []
    for row in index(corpus, since):
        if which != "all" and held_out(row["run_id"]) != (which == "held-out"):
            continue
        if row.get("outcome") == "error" or not row.get("trace"):
            continue
        trace, header = load_trace_gz(corpus / row["trace"])
        runs.append(Run(row, trace, header))
    return sorted(runs, key=lambda r: r.run_id)


# -- replaying the model ------------------------------------------------------------------------

def preflight_figures(run: Run) -> dict[str, float | None]:
    """The pre-flight's figures as ``assess`` takes them from before the start: D, W, the zero share."""
    pre = run.header.get("preflight")
    if not pre:
        return {}
    D, W = model.estimate_working_set([(float(t), float(r)) for t, r in pre["dirty_windows"]])
    return {"dirty_rate": D, "working_set": W, "zero_fraction": (pre.get("sample_pages") or {}).get("zero_fraction")}


def preflight_range_figures(run: Run) -> dict[str, Any]:
    """The pre-flight as ``assess`` takes it for the first pass: the dirty range the windows allow and
    the zero share of the pages sampled (with how many were)."""
    pre = run.header.get("preflight")
    if not pre or dirty_model is None:
        return {}
    per_gib = pre.get("dirty_sample_pages_per_gib", 512)
    windows = [dirty_model.Window(float(t), float(r), round(per_gib * pre["ram"] / 2**30)) for t, r in pre["dirty_windows"]]
    out: dict[str, Any] = {"dirty": dirty_model.dirty_range(windows, pre["ram"])}
    sp = pre.get("sample_pages") or {}
    if sp.get("zero_fraction") is not None:
        out["zero_fraction"], out["zero_sampled"] = float(sp["zero_fraction"]), int(sp.get("pages") or 0) or None
    return out


def replay(run: Run, upto: float | None = None, with_preflight: bool | str = False) -> list[tuple[Sample, model.Prediction]]:
    """The prediction after every sample (as the job makes them live: no pre-flight figures, unless
    ``with_preflight``), up to time ``upto``."""
    now = [(s, p) for s, p in replay_now(run, with_preflight) if upto is None or s.t <= upto]
    # what model.assess_held says, without re-reading the lookback for every sample: the same held()
    return [(s, hold.held(now[max(0, i - hold.HOLD_LOOKBACK):i + 1])) for i, (s, _) in enumerate(now)]


_NOW: dict[tuple[str, bool | str, tuple[float, ...]], list[tuple[Sample, model.Prediction]]] = {}


def model_constants() -> tuple[float, ...]:
    """The constants ``assess`` reads (the hold's excepted): what the replay cache is keyed on."""
    return tuple(getattr(model, name) for name in dir(model) if name.isupper() and isinstance(getattr(model, name), float)) + (
        getattr(dirty_model, "MIGRATING_SHARE", 0.0),)


def replay_now(run: Run, with_preflight: bool | str = False) -> list[tuple[Sample, model.Prediction]]:
    """``assess`` after every sample (what each sample alone says; cached: the hold's constants do
    not change it)."""
    key = (run.run_id, with_preflight, model_constants())
    if key not in _NOW:
        limit, cap, link = run.limits()
        extra = (preflight_range_figures(run) if with_preflight == "range" else preflight_figures(run)
                 if with_preflight else {})
        out = []
        ss = list(run.trace.samples)
        for i in range(1, len(ss) + 1):
            if ss[i - 1].status is MigrationStatus.COMPLETED:
                break
            out.append((ss[i - 1], model.assess(ss[:i], downtime_limit_s=limit, bandwidth_cap=cap, link=link,
                                                    **extra)))
        _NOW[key] = out
    return _NOW[key]


def at_fraction(run: Run, fraction: float, with_preflight: bool | str = False) -> model.Prediction | None:
    """The prediction from the samples up to ``fraction`` of the elapsed time (None: no sample yet)."""
    seq = replay(run, upto=fraction * run.elapsed, with_preflight=with_preflight)
    return seq[-1][1] if seq else None


def preflight(run: Run, ranged: bool = False) -> model.Prediction | None:
    """What `migrate --estimate` would say now, from the header's pre-flight, for the run's policy:
    from one dirty-rate figure (``estimate_working_set``, what `estimate` uses today), or with
    ``ranged`` from the range the windows allow (model/dirty.py) and the zero pages sample_pages saw."""
    pre = run.header.get("preflight")
    if not pre:
        return None
    windows = [(float(t), float(r)) for t, r in pre["dirty_windows"]]
    D, W = model.estimate_working_set(windows)
    params = pre["params"]
    cap = float(params.get("max-bandwidth") or 0) or None
    L = params.get("downtime-limit", 300) / 1000
    link = pre.get("link_bytes_per_s") or cap or 0.0
    extra: dict[str, Any] = {}
    if ranged:
        if dirty_model is None:
            return None
        per_gib = pre.get("dirty_sample_pages_per_gib", 512)
        extra["dirty"] = dirty_model.dirty_range(
            [dirty_model.Window(t, r, round(per_gib * pre["ram"] / 2**30)) for t, r in windows], pre["ram"])
        zero = (pre.get("sample_pages") or {}).get("zero_fraction")
        if zero is not None:
            extra["zero_fraction"] = zero
    est = estimate(ram=pre["ram"], dirty_rate=D, working_set=W, link=link, cap=cap, downtime_limit_s=L,
                   allow_postcopy=False, **extra)
    name = ESTIMATE_OPTION.get(run.policy) or AUTO_OPTION.get(est.auto, "precopy, uncapped")
    return {o.name: o.prediction for o in est.options}[name]


# -- figures ------------------------------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def fmt(x: float | None, unit: str = "%", digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


@dataclass
class Errors:
    """|error| of predicted against actual total time (%) and downtime (% and ms), and what had none."""
    total: list[float]
    down: list[float]
    down_ms: list[float]
    none: int            # completed runs without a time prediction (a verdict other than "will converge")


def errors(runs: Iterable[Run], predict_of: Any) -> Errors:
    e = Errors([], [], [], 0)
    for run in runs:
        if not run.completed or not run.total_s:
            continue
        p = predict_of(run)
        if p is None or p.total_s is None:
            e.none += 1
            continue
        e.total.append(abs(p.total_s - run.total_s) / run.total_s * 100)
        if p.downtime_ms is not None and run.downtime_ms:
            e.down.append(abs(p.downtime_ms - run.downtime_ms) / run.downtime_ms * 100)
            e.down_ms.append(abs(p.downtime_ms - run.downtime_ms))
    return e


def first_will_not(run: Run, confident: bool = True) -> float | None:
    for s, p in replay(run):
        if p.verdict is model.Verdict.WILL_NOT_CONVERGE and not (confident and p.rough):
            return s.t
    return None


def verdict_changes(run: Run, after: float = 3.0) -> int:
    said = [p.verdict.value + (" (rough)" if p.rough else "") for s, p in replay(run) if s.t >= after]
    return sum(1 for a, b in zip(said, said[1:]) if a != b)


STEADY = ("idle", "paced", "ws")     # workloads that dirty at one rate from start to end (text, hotcold: bursts)


def changes_after_first_pass(run: Run, flips_only: bool = False) -> int:
    """Verdict changes once the first pass is done (rough or not counts as the same verdict); with
    ``flips_only`` only those from one confident verdict to the other (will converge <-> will not)."""
    said = [p.verdict for s, p in replay(run) if s.pass_no >= 2]
    both = (model.Verdict.CONVERGES, model.Verdict.WILL_NOT_CONVERGE)
    return sum(1 for a, b in zip(said, said[1:]) if a != b and (not flips_only or (a in both and b in both)))


def verdicts_replaced(run: Run) -> int:
    """Verdict changes after the first pass that replace a verdict said (rough or not) by another or by
    "uncertain": the changes left when a verdict forming (uncertain -> a verdict) is not counted."""
    said = [p.verdict for s, p in replay(run) if s.pass_no >= 2]
    both = (model.Verdict.CONVERGES, model.Verdict.WILL_NOT_CONVERGE)
    return sum(1 for a, b in zip(said, said[1:]) if a != b and a in both)


def retractions(run: Run) -> int:
    """Times a confident (not rough) verdict said after the first pass is taken back: followed by
    anything else (the other verdict, uncertain, rough). Uncertain becoming confident is not one."""
    said = [p for s, p in replay(run) if s.pass_no >= 2]
    return sum(1 for a, b in zip(said, said[1:]) if a.verdict in (model.Verdict.CONVERGES, model.Verdict.WILL_NOT_CONVERGE)
               and not a.rough and (b.verdict is not a.verdict or b.rough))


def confident_wrong(run: Run) -> list[str]:
    """Non-rough verdicts contradicted by the outcome (unsteered runs only): when and what."""
    wrong = []
    for s, p in replay(run):
        if p.rough:
            continue
        if run.completed and p.verdict is model.Verdict.WILL_NOT_CONVERGE:
            wrong.append(f"{s.t:.1f} s: will not converge")
        elif not run.completed and p.verdict is model.Verdict.CONVERGES:
            wrong.append(f"{s.t:.1f} s: will converge")
    return wrong


# -- the report ---------------------------------------------------------------------------------

def corpus_table(rows: list[dict[str, Any]]) -> list[str]:
    cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[r["cell"]].append(r)
    out = ["| cell | runs (held out) | outcomes | total time (median, min-max) | downtime (median) | memory check |",
           "|---|---|---|---|---|---|"]
    for name in sorted(cells):
        rs = cells[name]
        outcomes = Counter(r["outcome"] for r in rs)
        times = [r["total_s"] for r in rs if r.get("total_s")]
        downs = [r["downtime_ms"] for r in rs if r.get("downtime_ms") is not None]
        mem = Counter(r.get("memcheck", "-").split(":")[0] for r in rs if r["outcome"] != "error")
        out.append(f"| {name} | {len(rs)} ({sum(held_out(r['run_id']) for r in rs)}) | "
                   + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + " | "
                   + (f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})" if times else "-")
                   + f" | {fmt(statistics.median(downs), ' ms') if downs else '-'} | "
                   + ", ".join(f"{k} {v}" for k, v in sorted(mem.items())) + " |")
    done = [r for r in rows if r.get("completed")]
    by_work: dict[str, Counter[str]] = defaultdict(Counter)
    for r in done:
        by_work[f"{r['guest']} {r['work']}"][r.get("memcheck", "-").split(":")[0]] += 1
    out += ["", f"Destination checks of the {len(done)} completed runs, by guest and workload: "
            + "; ".join(f"{k}: " + ", ".join(f"{m} {n}" for m, n in sorted(c.items())) for k, c in sorted(by_work.items()))
            + f". Runs that ended in an error of the bench: {sum(r['outcome'] == 'error' for r in rows)}."]
    return out


def throughput_table(runs: list[Run]) -> list[str]:
    """How fast the migrations moved, by guest, link and whether kvmshell uncapped the bandwidth: the
    median of the sample-to-sample throughputs while active (all runs: a property of the machine)."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in runs:
        capped = "QEMU's 128 MiB/s cap" if r.policy == "defaults" else "uncapped"
        groups[(r.row["guest"], r.row["link"], capped)] += [s.throughput for s in r.trace.samples
                                                          if s.status is MigrationStatus.ACTIVE and s.throughput > 0]
    out = ["| guest | link | bandwidth | samples | throughput p50 (p10-p90) |", "|---|---|---|---|---|"]
    for (guest, link, capped), v in sorted(groups.items()):
        if v:
            out.append(f"| {guest} | {link} | {capped} | {len(v)} | {pct(v, .5) / 1e6:.0f} MB/s "
                       f"({pct(v, .1) / 1e6:.0f}-{pct(v, .9) / 1e6:.0f}) |")
    return out


def score(runs: list[Run]) -> list[str]:
    out = [f"Held-out runs scored: {len(runs)} ({sum(r.completed for r in runs)} completed within the cap), "
           f"LATER_PASSES = {model.LATER_PASSES}.", "",
           "| moment | policies | runs with a time prediction | total time p50 / p90 abs error | "
           "downtime p50 / p90 abs error | downtime p50 / p90 abs error (ms) | completed runs without a prediction |",
           "|---|---|---|---|---|---|---|"]
    groups = {"all": runs, "unsteered": [r for r in runs if r.policy in UNSTEERED],
              "auto": [r for r in runs if r.policy == "auto"]}
    for moment, fn in MOMENTS:
        for gname, group in groups.items():
            e = errors(group, fn)
            out.append(f"| {moment} | {gname} | {len(e.total)} | {fmt(pct(e.total, .5))} / {fmt(pct(e.total, .9))} | "
                       f"{fmt(pct(e.down, .5))} / {fmt(pct(e.down, .9))} | {fmt(pct(e.down_ms, .5), ' ms')} / "
                       f"{fmt(pct(e.down_ms, .9), ' ms')} | {e.none} |")
    out += ["", "Ranges of the total time (completed runs; a time is given only when its range is tight):", "",
            "| moment | completed runs with a range | outcome inside it | range width p50 (high / low) | of them with a time |",
            "|---|---|---|---|---|"]
    for moment, fn in MOMENTS:
        rs = [(r, p) for r in runs if r.completed and r.total_s and (p := fn(r)) is not None and p.total_range_s]
        inside = sum(1 for r, p in rs if p.total_range_s[0] * 0.999 <= r.total_s <= p.total_range_s[1] * 1.001)
        widths = [p.total_range_s[1] / p.total_range_s[0] for r, p in rs if p.total_range_s[0] > 0]
        out.append(f"| {moment} | {len(rs)} | {inside} | {fmt(pct(widths, .5), '', 2)} | "
                   f"{sum(p.total_s is not None for r, p in rs)} |")
    unsteered = groups["unsteered"]
    for moment, fn in MOMENTS:
        table: Counter[tuple[str, bool]] = Counter()
        for r in unsteered:
            p = fn(r)
            said = "no prediction" if p is None else p.verdict.value + (" (rough)" if p.rough else "")
            table[(said, r.completed)] += 1
        out += ["", f"Verdict at {moment} against the outcome (unsteered policies, {len(unsteered)} runs):", "",
                "| verdict | completed within the cap | not completed |", "|---|---|---|"]
        for said in sorted({k[0] for k in table}):
            out.append(f"| {said} | {table[(said, True)]} | {table[(said, False)]} |")
    out += ["", measured_by(runs, 0.25)]
    stuck = [r for r in unsteered if not r.completed]
    firsts = [t for r in stuck if (t := first_will_not(r)) is not None]
    out += ["", f"Time to the first right (not rough) \"will not converge\" on the {len(stuck)} unsteered runs that "
                f"did not complete: p50 {fmt(pct(firsts, .5), ' s', 1)}, p90 {fmt(pct(firsts, .9), ' s', 1)}, "
                f"never said on {len(stuck) - len(firsts)}."]
    changes = {r.run_id: verdict_changes(r) for r in runs}
    changed = [k for k, v in changes.items() if v]
    out.append(f"Verdict changes after the first 3 s: {len(changed)} of {len(runs)} runs change at least once "
               f"({sum(changes.values())} changes; most: "
               + (", ".join(f"{k} {changes[k]}" for k in sorted(changed, key=lambda k: -changes[k])[:3]) or "none")
               + ").")
    steady = [r for r in runs if r.row.get("work") in STEADY]
    moved = {r.run_id: n for r in steady if (n := changes_after_first_pass(r))}
    out.append(f"Verdict changes after the first pass on steady workloads ({', '.join(STEADY)}): {len(moved)} of "
               f"{len(steady)} runs ({sum(moved.values())} changes"
               + (": " + ", ".join(f"{k} {v}" for k, v in sorted(moved.items(), key=lambda kv: -kv[1])[:4]) if moved else "")
               + f"); from one confident verdict to the other: "
               f"{sum(changes_after_first_pass(r, True) > 0 for r in steady)} runs; a verdict said (rough or not) "
               f"replaced, not only uncertain becoming a verdict: {sum(verdicts_replaced(r) > 0 for r in steady)} runs; "
               f"of the unsteered steady runs: {sum(1 for r in steady if r.policy in UNSTEERED and r.run_id in moved)} of "
               f"{sum(1 for r in steady if r.policy in UNSTEERED)} change.")
    took_back = {r.run_id: n for r in steady if (n := retractions(r))}
    out.append(f"Confident verdicts taken back after the first pass on steady workloads: {len(took_back)} of "
               f"{len(steady)} runs ({sum(took_back.values())} times"
               + (": " + ", ".join(f"{k} {v}" for k, v in sorted(took_back.items(), key=lambda kv: -kv[1])[:4])
                  if took_back else "") + "); of the unsteered ones: "
               f"{sum(1 for r in steady if r.policy in UNSTEERED and r.run_id in took_back)} of "
               f"{sum(1 for r in steady if r.policy in UNSTEERED)}.")
    wrong = {r.run_id: w for r in unsteered if (w := confident_wrong(r))}
    out.append(f"Confident wrong verdicts (not rough, contradicted by the outcome; unsteered): {len(wrong)} of "
               f"{len(unsteered)} runs" + ("".join(f"; {k}: {len(v)} samples, first at {v[0]}"
                                                    for k, v in sorted(wrong.items())) if wrong else "") + ".")
    return out


# -- moments --------------------------------------------------------------------------------------

def after_first_sync(run: Run) -> model.Prediction | None:
    """The first prediction made after the first sync: the moment LATER_PASSES is applied at."""
    for s, p in replay(run):
        if s.pass_no >= 2 and p.verdict is not model.Verdict.UNKNOWN:
            return p
    return None


def point_at(run: Run, fraction: float) -> model.Prediction | None:
    """``at_fraction`` with the pre-flight range + zero pages passed, and a time whatever the width of its
    range (TIGHT off): the point the first pass's measurements give (its own rate of non-zero pages where it
    has run FIRST_PASS_SPAN_S, else the link or cap; the zero share sampled before the start)."""
    saved, model.TIGHT = model.TIGHT, float("inf")
    try:
        return at_fraction(run, fraction, "range")
    finally:
        model.TIGHT = saved


def measured_by(runs: list[Run], fraction: float) -> str:
    """What the completed runs had measured at ``fraction`` of their elapsed time: why a time is rare then."""
    done = [r for r in runs if r.completed and r.total_s]
    seen = [[s for s in r.trace.samples if s.t <= fraction * r.elapsed] for r in done]
    active = [sum(s.status is MigrationStatus.ACTIVE for s in ss) for ss in seen]
    firsts = [next(s.t for s in r.trace.samples if s.status is MigrationStatus.ACTIVE) / r.total_s * 100
              for r in done if any(s.status is MigrationStatus.ACTIVE for s in r.trace.samples)]
    return (f"By {100 * fraction:.0f} % of the elapsed time, of {len(done)} completed runs: {active.count(0)} have no active "
            f"sample yet (QEMU answers no query during its setup), {sum(model.first_pass_rate(ss) is not None for ss in seen)} "
            f"have the first pass's own rate measured, {sum(any(s.pass_no >= 2 for s in ss) for ss in seen)} a sync; the "
            f"first active sample comes at p10 / p50 / p90 {fmt(pct(firsts, .1))} / {fmt(pct(firsts, .5))} / "
            f"{fmt(pct(firsts, .9))} of the total time.")


MOMENTS = (("pre-flight, one figure", preflight), ("pre-flight, range + zero pages", lambda r: preflight(r, True)),
           ("25 % of elapsed", lambda r: at_fraction(r, 0.25)),
           ("25 % of elapsed, pre-flight figures passed to assess", lambda r: at_fraction(r, 0.25, True)),
           ("25 % of elapsed, pre-flight range + zero pages passed to assess", lambda r: at_fraction(r, 0.25, "range")),
           ("25 % of elapsed, as above, the point whatever its range's width", lambda r: point_at(r, 0.25)),
           ("50 % of elapsed, pre-flight range + zero pages passed to assess", lambda r: at_fraction(r, 0.5, "range")),
           ("after the first sync", after_first_sync))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--set", choices=("held-out", "fit", "all"), default="held-out")
    ap.add_argument("--fit", action="store_true", help="fit the model's constants on the fit set (bench/fit_corpus.py)")
    ap.add_argument("--since", metavar="DATE", help="only the runs recorded from this UTC date and time on "
                    "(ISO, as the index's \"date\": 2026-12-03T19:00)")
    args = ap.parse_args()
    if not (args.corpus / "INDEX.jsonl").exists():
        print(f"score_corpus: no {args.corpus / 'INDEX.jsonl'}: record the corpus first with bench/corpus.py",
              file=sys.stderr)
        return 2
    if args.fit:
        sys.path.insert(0, str(Path(__file__).parent))
        import fit_corpus                      # the fits (bench/fit_corpus.py): they replay through this module
        print("\n".join(fit_corpus.fit_all(load_runs(args.corpus, "fit", args.since))))
        return 0
    rows = index(args.corpus, args.since)
    if not rows:
        print(f"score_corpus: no run in {args.corpus / 'INDEX.jsonl'} recorded since {args.since}", file=sys.stderr)
        return 2
    print("\n".join(corpus_table(rows) + [""] + throughput_table(load_runs(args.corpus, "all", args.since)) + [""]
                    + score(load_runs(args.corpus, args.set, args.since))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
