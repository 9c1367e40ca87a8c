"""Replay (offline, on the corpus): the pre-flight's rate as min(link, the fastest first-pass rate of
the same guest, RAM and link over its last 5 earlier runs), against the link's rate alone. Scores the
pre-flight's total time (range + zero pages) on the held-out precopy and defaults runs that completed.
Not in kvmshell: bench/RESULTS.md, "Tried offline, not applied: the pre-flight's rate from earlier runs".

    .venv/bin/python bench/rate_seen_replay.py [--list]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import score_corpus as sc  # noqa: E402
from kvmshell.core.migration.model.predict import first_pass_rate  # noqa: E402

LAST = 5


def error(p: object, run: sc.Run) -> float | None:
    t = getattr(p, "total_s", None)
    return None if t is None else abs(t - run.elapsed) / run.elapsed


def main() -> int:
    runs = sorted(sc.load_runs(sc.CORPUS, "all"), key=lambda r: str(r.row.get("date", "")))
    seen: dict[tuple[str, int, str], list[float | None]] = {}
    rows = []
    for r in runs:
        key = (r.row["guest"], r.row["ram"], r.row["link"])
        before = [x for x in seen.get(key, [])[-LAST:] if x]
        pre = r.header.get("preflight")
        if pre and r.completed and r.policy in ("precopy", "defaults") and r.row.get("held_out"):
            now = sc.preflight(r, True)
            link = pre.get("link_bytes_per_s")
            other = now
            if before and link:
                header = dict(r.header, preflight=dict(pre, link_bytes_per_s=min(link, max(before))))
                other = sc.preflight(sc.Run(r.row, r.trace, header), True)
            rows.append((r.run_id, error(now, r), error(other, r)))
        seen.setdefault(key, []).append(first_pass_rate(list(r.trace.samples)) if r.policy in ("precopy", "auto")
                                        else None)
    if "--list" in sys.argv:
        for run_id, a, b in rows:
            print(run_id, a, b)
    for i, name in ((1, "the link's rate"), (2, "min(link, rate seen before)")):
        e = [x[i] for x in rows if x[i] is not None]
        print(f"{name}: {len(e)} of {len(rows)} runs with a time, p50 {100 * sc.pct(e, 0.5):.0f} %, "
              f"p90 {100 * sc.pct(e, 0.9):.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
