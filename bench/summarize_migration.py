"""Turn bench_migration.py's JSON lines into the Markdown table for RESULTS.md, and plot chosen runs.

    .venv/bin/python bench/summarize_migration.py bench/results-migration.jsonl [--plots bench/plots]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvmshell.core.migration.model.predict import Verdict, assess
from kvmshell.core.migration.model.report import write_report
from kvmshell.core.migration.model.samples import Trace, load_trace


def first_no(trace: Trace) -> float | None:
    """When the current model, replayed, first says "will not converge" (rough calls included)."""
    ss = list(trace.samples)
    cap = trace.header.params.get("max-bandwidth")
    limit = trace.header.params.get("downtime-limit", 300) / 1000
    for i in range(1, len(ss) + 1):
        p = assess(ss[:i], downtime_limit_s=limit, bandwidth_cap=cap if cap and cap < 1e10 else None,
                   link=trace.header.link_bytes_per_s)
        if p.verdict is Verdict.WILL_NOT_CONVERGE:
            return ss[i - 1].t
    return None


def first_prediction(trace: Trace) -> float | None:
    """The current model's first confident total-time prediction after the first pass, replayed."""
    ss = list(trace.samples)
    cap = trace.header.params.get("max-bandwidth")
    limit = trace.header.params.get("downtime-limit", 300) / 1000
    for i in range(2, len(ss) + 1):
        if ss[i - 1].pass_no < 2:
            continue
        p = assess(ss[:i], downtime_limit_s=limit, bandwidth_cap=cap if cap and cap < 1e10 else None,
                   link=trace.header.link_bytes_per_s)
        if p.verdict in (Verdict.CONVERGES, Verdict.WILL_NOT_CONVERGE) and not p.rough:
            return p.total_s
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--plots", default="bench/plots")
    ap.add_argument("--plot", action="append", default=["1gbit-150-defaults", "1gbit-150-defaults+ac",
                                                         "1gbit-150-auto", "1gbit-150-auto+postcopy"])
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    print("| link | load | policy | completed | total | downtime | sent | memory check | said 'will not converge' at | "
          "predicted total (after pass 1) | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    traces = Path(args.results).with_suffix("")
    for r in rows:
        path = traces / f"{r['link']}-{r['load']}-{r['policy']}.jsonl"
        if path.exists():
            r["predicted_total_s"] = first_prediction(load_trace(path))
            r["wnc_after_s"] = first_no(load_trace(path))
        total = f"{r['total_s']:.2f} s" if r["total_s"] is not None else "-"
        down = f"{r['downtime_ms']} ms" if r["downtime_ms"] is not None else "-"
        sent = f"{r['sent_mb']:.0f} MB" if r["sent_mb"] is not None else "-"
        pred = r["predicted_total_s"]
        steered = any(d.split(" ", 1)[1].startswith(("throttle", "postcopy")) for d in r["decisions"]
                      if " " in d)
        err = "-"
        if pred is not None and r["total_s"]:
            qemu_steers = r["policy"] == "defaults+ac"
            err = f"{(pred - r['total_s']) / r['total_s'] * 100:+.0f} %" + (
                " (steered)" if steered else " (QEMU throttles)" if qemu_steers else "")
        wnc = f"{r['wnc_after_s']:.1f} s" if r["wnc_after_s"] is not None else "-"
        status = "yes" if r["completed"] else r["status"]
        print(f"| {r['link']} | {r['load']} | {r['policy']} | {status} | {total} | {down} | {sent} | {r['memcheck']} "
              f"| {wnc} | {f'{pred:.1f} s' if pred is not None else '-'} | {err} |")
    out = Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.plot:
        path = traces / f"{name}.jsonl"
        if path.exists():
            write_report(load_trace(path), out / f"{name}.svg")


if __name__ == "__main__":
    main()
