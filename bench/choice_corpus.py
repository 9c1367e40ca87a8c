"""auto's pre-flight choice with postcopy allowed (model/choice.py), replayed on every corpus run's recorded
pre-flight (bench/corpus), against what that run's pre-copy (steered or not) actually took. Offline, ~2 s.

Per run: the lever ``choose`` picks at the link's rate, postcopy at once's predicted time, pre-copy's at
the range's ends, and the run's real total. Then, by range: how often postcopy at once is chosen and
the real pre-copy time over postcopy's predicted one (postcopy's prediction is checked against hand
postcopy on the lab guest only: bench/RESULTS.md).

    .venv/bin/python bench/choice_corpus.py [--set all|fit|held-out] [--quiet]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.score_corpus import load_runs, preflight_range_figures  # noqa: E402
from kvmshell.core.migration.model.choice import POSTCOPY, choose  # noqa: E402
from kvmshell.core.migration.model.predict import Verdict  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="all", choices=("all", "fit", "held-out"))
    ap.add_argument("--quiet", action="store_true", help="the summary only")
    args = ap.parse_args()
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
