"""The trace corpus (bench/corpus/): the fit/held-out split is fixed, the committed held-out traces
replay through the current model, and the scorer prints its table. No QEMU: the traces are on disk."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kvmshell.core.migration.model.predict import Prediction
from kvmshell.core.values.models import MigrationStatus

BENCH = Path(__file__).resolve().parent.parent / "bench"
CORPUS = BENCH / "corpus"


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scorer() -> ModuleType:
    return bench_module("score_corpus")


@pytest.fixture(scope="module")
def corpus() -> ModuleType:
    return bench_module("corpus")


def test_split_is_fixed_by_the_run_id(scorer: ModuleType, corpus: ModuleType) -> None:
    """The same run id lands on the same side, in the recorder and the scorer, and as it was recorded."""
    fixed = {"linux-ws-512m-none-defaults-r1": True, "linux-idle-512m-1gbit-defaults-r1": False,
             "lab-ws-512m-1gbit-auto-r2": False, "linux-text-2048m-10gbit-precopy-r3": True}
    for run_id, side in fixed.items():
        assert scorer.held_out(run_id) is side and corpus.held_out(run_id) is side, run_id
    rows = scorer.index(CORPUS)
    assert rows, "no runs in bench/corpus/INDEX.jsonl"
    for row in rows:
        assert row["held_out"] == scorer.held_out(row["run_id"]), row["run_id"]
    ids = [c.run_id(n) for c in corpus.grid() for n in (1, 2, 3)]
    share = sum(map(scorer.held_out, ids)) / len(ids)
    assert 0.2 < share < 0.4, share


def test_held_out_traces_replay_through_the_model(scorer: ModuleType) -> None:
    runs = scorer.load_runs(CORPUS, "held-out")
    assert runs, "no held-out trace committed"
    picked = [r for r in runs if r.completed][:3] + [r for r in runs if not r.completed][:3]
    for run in picked:
        assert run.header["corpus"]["run_id"] == run.run_id
        pre = scorer.preflight(run)
        assert isinstance(pre, Prediction) and pre.verdict.value
        seq = scorer.replay(run)
        assert seq and all(isinstance(p, Prediction) for _, p in seq), run.run_id
        if run.completed:
            last = run.trace.samples[-1]
            assert last.status is MigrationStatus.COMPLETED
            assert last.total_time_ms / 1000 == pytest.approx(run.total_s, abs=0.01)
        else:
            assert all(s.status is not MigrationStatus.COMPLETED for s in run.trace.samples)


def test_the_scorers_replay_is_what_assess_held_says(scorer: ModuleType) -> None:
    """The scorer holds the verdicts over its cached per-sample predictions: the same as assess_held."""
    from kvmshell.core.migration.model.hold import assess_held
    run = next(r for r in scorer.load_runs(CORPUS, "fit") if r.run_id == "linux-ws-2048m-none-defaults-r3")
    limit, cap, link = run.limits()
    ss = list(run.trace.samples)
    for i, (s, p) in enumerate(scorer.replay(run), 1):
        q = assess_held(ss[:i], downtime_limit_s=limit, bandwidth_cap=cap, link=link)
        assert (q.verdict, q.total_s, q.rough) == (p.verdict, p.total_s, p.rough), (s.t, q.line(), p.line())


def test_scorer_prints_the_held_out_table(scorer: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    runs = scorer.load_runs(CORPUS, "held-out")
    lines = scorer.score(runs)
    assert lines[0].startswith(f"Held-out runs scored: {len(runs)} ")
    text = "\n".join(lines)
    assert "| pre-flight, one figure | all |" in text and "| 25 % of elapsed | unsteered |" in text
    assert "Verdict changes after the first 3 s:" in text
    table = scorer.corpus_table(scorer.index(CORPUS))
    rows = [line for line in table if line.startswith("| ")]
    assert len(rows) == 1 + len({json.loads(line)["cell"] for line in
                                 (CORPUS / "INDEX.jsonl").read_text().splitlines() if line.strip()})
    assert table[-1].startswith("Destination checks of the ")


def test_scorer_without_a_corpus_says_so(scorer: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", ["score_corpus.py", "--corpus", str(tmp_path)])
    assert scorer.main() == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bench/corpus.py" in err


def test_no_verdict_said_after_the_first_pass_is_replaced_on_steady_unsteered_fit_runs(scorer: ModuleType) -> None:
    """The flip-flop check on the corpus (fit set: what the hold was chosen on). A guest whose workload
    does not change, migrated without steering: once the first pass is done, a verdict said (rough or
    not) is never replaced by the other one or by "uncertain"; "uncertain" may become a verdict."""
    runs = [r for r in scorer.load_runs(CORPUS, "fit") if r.row.get("work") in scorer.STEADY
            and r.policy in scorer.UNSTEERED]
    assert len(runs) >= 30
    replaced = {r.run_id: n for r in runs if (n := scorer.verdicts_replaced(r))}
    assert not replaced, replaced


def test_since_scores_only_the_runs_recorded_from_then_on(scorer: ModuleType, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A corpus recorded into again: ``--since`` keeps the runs whose index line is dated then or later (the
    latest line of a run id counts), so a fresh held-out set is scored apart from the one looked at before."""
    lines = [{"run_id": "a-r1", "date": "2026-12-03T10:00:00Z"}, {"run_id": "b-r1", "date": "2026-12-03T19:04:47Z"},
             {"run_id": "a-r1", "date": "2026-12-03T19:30:00Z"}, {"run_id": "c-r1", "date": "2026-12-03T18:59:59Z"},
             {"run_id": "d-r1"}]
    (tmp_path / "INDEX.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    assert sorted(r["run_id"] for r in scorer.index(tmp_path, "2026-12-03T19:00")) == ["a-r1", "b-r1"]
    assert len(scorer.index(tmp_path)) == 4
    monkeypatch.setattr("sys.argv", ["score_corpus.py", "--corpus", str(tmp_path), "--since", "2026-12-04"])
    assert scorer.main() == 2
    assert "recorded since 2026-12-04" in capsys.readouterr().err
