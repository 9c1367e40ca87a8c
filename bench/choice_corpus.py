"""auto's pre-flight choice with postcopy allowed (model/choice.py), replayed on every corpus run's recorded
pre-flight (bench/corpus), against what that run's pre-copy (steered or not) actually took. Offline, ~2 s.

Per run: the lever ``choose`` picks at the link's rate, postcopy at once's predicted time, pre-copy's at
the range's ends, and the run's real total. Then, by range: how often postcopy at once is chosen and
the real pre-copy time over postcopy's predicted one (postcopy's prediction is checked against hand
postcopy on the lab guest only: bench/RESULTS.md).

    .venv/bin/python bench/choice_corpus.py [--set all|fit|held-out] [--quiet]

``--stall``: postcopy at once's guest-visible stall (model/choice.py ``postcopy_stall``) against the
blackouts bench/bench_fewer.py recorded (bench/fewer/*.jsonl.gz: every hand:postcopy run and every
auto+pf+postcopy run that started postcopy at once). Fits the lines below and above every FIT run's
blackout over T = non-zero bytes / link rate (``envelope``), then scores the model's constants on the
HELD-OUT runs (the split: a hash of guest+cell+run, ``corpus.held_out``): how many it covers, by how much.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gzip  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from itertools import combinations  # noqa: E402

from bench.corpus import held_out  # noqa: E402
from bench.score_corpus import load_runs, preflight_range_figures  # noqa: E402
from kvmshell.core.migration.model.choice import POSTCOPY, choose, postcopy_stall  # noqa: E402
from kvmshell.core.migration.model.predict import Verdict  # noqa: E402


LINK = {"1gbit": 125e6, "10gbit": 1250e6}


FITTED_ON = "fewer-s5*.jsonl.gz"      # the runs the constants were fitted (FIT) and scored (HELD-OUT) on
LATER = "fewer-s6*.jsonl.gz"          # recorded after the fit: scored only


def stall_runs(pattern: str = FITTED_ON) -> list[tuple[str, bool, float, float]]:
    """(key, held out, T s, blackout s) of every postcopy-at-once run recorded by bench_fewer.py."""
    out = []
    for path in sorted((Path(__file__).parent / "fewer").glob(pattern)):
        for line in gzip.open(path, "rt"):
            r = json.loads(line)
            at_once = r["policy"] == "hand:postcopy" or (
                r["policy"] == "auto+pf+postcopy" and any("pre-flight chose postcopy at once" in d for d in r["decisions"]))
            if not at_once or r["status"] != "completed" or r.get("blackout_ms") is None or r["link"] not in LINK:
                continue
            key = f"{r['guest']}|{r['load']}|{r['link']}|{r['ram']}|{r['run']}"
            out.append((f"{key}|{r['policy']}", held_out(key), r["nonzero_mb"] * 1e6 / LINK[r["link"]],
                        r["blackout_ms"] / 1000))
    return out


def envelope(points: list[tuple[float, float]], above: bool) -> tuple[float, float]:
    """(c, k) of the line c + k*T (c, k >= 0) just above (or below) every point: of the lines through
    two points or one point (flat, or through the origin), the lowest (highest) on average over them."""
    lines = [(y, 0.0) for _, y in points] + [(0.0, y / t) for t, y in points if t > 0]
    for (t1, y1), (t2, y2) in combinations(points, 2):
        if t1 != t2:
            k = (y2 - y1) / (t2 - t1)
            lines.append((y1 - k * t1, k))
    ok = [(c, k) for c, k in lines if c >= 0 and k >= 0
          and all((c + k * t >= y - 1e-9) if above else (c + k * t <= y + 1e-9) for t, y in points)]
    mean = [(sum(c + k * t for t, _ in points), (c, k)) for c, k in ok]
    return (min if above else max)(mean)[1]


def stall_report() -> int:
    runs = stall_runs()
    fit = [(t, y) for _, h, t, y in runs if not h]
    held = [(key, t, y) for key, h, t, y in runs if h]
    print(f"{len(runs)} postcopy-at-once runs: {len(fit)} fit, {len(held)} held out "
          f"(keys: {len({k.rsplit('|', 1)[0] for k, *_ in held})} held-out guest+cell+run)")
    (cl, kl), (ch, kh) = envelope(fit, above=False), envelope(fit, above=True)
    print(f"fitted on FIT: low {cl * 1000:.0f} ms + {kl:.3f} x T, high {ch * 1000:.0f} ms + {kh:.3f} x T")
    inside = over = 0
    excess = []
    for key, t, y in sorted(held):
        s = postcopy_stall(sent=t, rate=1.0)
        ok = s.low_s <= y <= s.high_s
        inside += ok
        over += y > s.high_s
        excess.append(s.high_s - y)
        print(f"  {key:55} T {t:.2f} s  blackout {y * 1000:4.0f} ms  model {s.low_s * 1000:4.0f}-{s.high_s * 1000:4.0f} ms"
              f"{'' if ok else '  OUTSIDE'}")
    if held:
        print(f"HELD-OUT (model's constants): {inside}/{len(held)} inside the range, {over} above its high end; "
              f"high end - blackout: median {statistics.median(excess) * 1000:.0f} ms, "
              f"{min(excess) * 1000:.0f} to {max(excess) * 1000:.0f} ms")
    later = stall_runs(LATER)
    if later:
        inside = sum(postcopy_stall(sent=t, rate=1.0).low_s <= y <= postcopy_stall(sent=t, rate=1.0).high_s
                     for _, _, t, y in later)
        print(f"LATER (recorded after the fit, {LATER}): {inside}/{len(later)} inside the range; blackouts "
              + ", ".join(f"{y * 1000:.0f} ms (T {t:.2f} s)" for _, _, t, y in sorted(later, key=lambda r: r[2])))
    ratio = sorted(y / t for t, y in fit if t > 0)
    print(f"FIT blackout / T: {ratio[0]:.2f}-{ratio[-1]:.2f} (median {statistics.median(ratio):.2f})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="all", choices=("all", "fit", "held-out"))
    ap.add_argument("--quiet", action="store_true", help="the summary only")
    ap.add_argument("--stall", action="store_true", help="postcopy at once's stall: fit and held-out score")
    args = ap.parse_args()
    if args.stall:
        return stall_report()
    rows = []
    for r in load_runs(Path(__file__).parent / "corpus", args.set):
        pre = r.header.get("preflight") or {}
        fig = preflight_range_figures(r)
        if not pre.get("link_bytes_per_s") or "dirty" not in fig:
            continue
        link = float(pre["link_bytes_per_s"])
        c = choose(ram=pre["ram"], dirty=fig["dirty"], rate=link, link=link,
                   downtime_limit_s=(pre["params"].get("downtime-limit") or 300) / 1000, allow_postcopy=True,
                   zero_fraction=fig.get("zero_fraction") or 0.0)
        rows.append((r, c))
        if not args.quiet:
            actual = f"{r.total_s:.1f} s" if r.completed and r.total_s is not None else r.row.get("outcome")
            print(f"{r.run_id:45} {c.lever:8} postcopy at once {c.postcopy_s:.1f} s, pre-copy {c.precopy_times():14} "
                  f"actual {actual}")
    kinds = {"converges at both ends": lambda c: c.low.verdict is c.high.verdict is Verdict.CONVERGES,
             "converges at the low end, never at the high end": lambda c: c.low.verdict is Verdict.CONVERGES
             and c.high.verdict is Verdict.WILL_NOT_CONVERGE,
             "never at either end": lambda c: c.low.verdict is c.high.verdict is Verdict.WILL_NOT_CONVERGE}
    print(f"\n{len(rows)} runs with a recorded pre-flight ({args.set})")
    for name, kind in kinds.items():
        these = [(r, c) for r, c in rows if kind(c)]
        done = sorted(r.total_s / c.postcopy_s for r, c in these if r.completed and r.total_s and c.postcopy_s)
        print(f"- {name}: {len(these)} runs, postcopy at once chosen on {sum(c.lever == POSTCOPY for _, c in these)}; "
              f"{len(these) - len(done)} did not complete; real pre-copy / predicted postcopy at once on the "
              f"completed: {', '.join(f'{x:.1f}' for x in done) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
