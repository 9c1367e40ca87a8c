"""Strategies as objects: each in one file, found by name, and what each decides on a sample (the
decisions against real QEMU are in test_live.py and test_dirty_limit.py)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.live.strategies import offered, parse_strategy, strategy_named, summaries
from kvmshell.core.migration.live.strategies.base import Strategy
from kvmshell.core.migration.model.predict import Prediction, Verdict
from kvmshell.core.migration.model.samples import Sample

PACKAGE = Path(__file__).resolve().parent.parent / "kvmshell/core/migration/live/strategies"


@dataclass
class Levers:
    """The job as a strategy sees it: its request and the two levers, recorded."""

    req: MigrationRequest
    postcopy_started: bool = False
    throttle_armed: bool = False
    pulled: list[tuple[str, str]] = field(default_factory=list)

    def start_postcopy(self, why: str) -> None:
        self.postcopy_started = True
        self.pulled.append(("postcopy", why))

    def arm_throttle(self, pred: Prediction, why: str) -> None:
        self.throttle_armed = True
        self.pulled.append(("throttle", why))


def sample(pass_no: int, remaining: int = 100 << 20) -> Sample:
    return Sample(t=5.0, status="active", pass_no=pass_no, transferred=600 << 20, remaining=remaining,
                  total=512 << 20, dirty_pages_rate=0, dirty_bytes_rate=0, mbps=1000.0, throughput=125e6,
                  expected_downtime_ms=None, cpu_throttle=0, postcopy_requests=0)


STUCK = Prediction(Verdict.WILL_NOT_CONVERGE, "working set 105 MB > 38 MB per downtime", rate=125e6)
FINE = Prediction(Verdict.CONVERGES, "converges", time_left_s=1.0, rate=125e6)
SLOW = Prediction(Verdict.CONVERGES, "converges slowly", time_left_s=45.0, rate=125e6)


def decide(name: str, pred: Prediction, pass_no: int = 2, **req: object) -> list[tuple[str, str]]:
    levers = Levers(MigrationRequest("vm", "dst", strategy=name, **req))  # type: ignore[arg-type]
    strategy_named(name)(levers.req).on_sample(levers, sample(pass_no), pred)  # type: ignore[arg-type]
    return levers.pulled


def test_each_strategy_is_one_class_in_one_module_and_found_by_name() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "base"))
    for stem in modules:
        tree = ast.parse((PACKAGE / f"{stem}.py").read_text())
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        assert len(classes) == 1 and any(getattr(b, "id", "") == "Strategy" for b in classes[0].bases), stem
    names = {strategy_named(n).name for n in (*offered(), "none")}
    assert len(names) == len(modules) == 5
    assert offered()[0] == "auto" and "none" not in offered()       # the default first; observe is kvmshell's own


def test_every_surface_reads_the_one_registry() -> None:
    assert [n for n, _ in summaries()] == list(offered())
    assert parse_strategy("converge") == "converge"
    with pytest.raises(ValueError, match="expected one of auto, precopy, converge, postcopy"):
        parse_strategy("none")
    spec = default_registry().get("migrate")
    assert spec is not None
    flag = spec.flag("--strategy")
    assert flag is not None and " | ".join(offered()) in flag.help


@pytest.mark.parametrize("name, pred, pass_no, req, pulled", [
    ("precopy", STUCK, 5, {}, []),
    ("postcopy", FINE, 1, {}, []),
    ("postcopy", FINE, 2, {}, [("postcopy", "the first full pass is done")]),
    ("converge", STUCK, 1, {}, []),                                   # never on the first pass
    ("converge", STUCK, 2, {}, [("throttle", STUCK.reason)]),
    ("converge", FINE, 3, {}, []),
    ("converge", SLOW, 3, {}, [("throttle", "pre-copy would need 45 s more")]),
    ("auto", STUCK, 2, {}, [("throttle", STUCK.reason)]),
    ("auto", STUCK, 2, {"allow_postcopy": True}, [("postcopy", STUCK.reason)]),
    ("auto", FINE, 4, {"allow_postcopy": True}, []),
    ("none", STUCK, 9, {}, []),
])
def test_what_each_strategy_decides(name: str, pred: Prediction, pass_no: int, req: dict[str, object],
                                    pulled: list[tuple[str, str]]) -> None:
    assert decide(name, pred, pass_no, **req) == pulled


def test_auto_with_postcopy_at_hand_escalates_when_precopy_takes_twice_as_long() -> None:
    # 100 MiB left at 125 MB/s: postcopy about 1.3 s; pre-copy's 45 s is far more than twice that
    [(lever, why)] = decide("auto", SLOW, 3, allow_postcopy=True, link=125e6)
    assert lever == "postcopy" and why.startswith("pre-copy would need 45.0 s more") and "postcopy about 1.3 s" in why


def test_a_lever_is_pulled_once() -> None:
    levers = Levers(MigrationRequest("vm", "dst", strategy="converge"), throttle_armed=True)
    strategy_named("converge")(levers.req).on_sample(levers, sample(3), STUCK)  # type: ignore[arg-type]
    assert levers.pulled == []


@pytest.mark.parametrize("name, postcopy, converge, params", [
    ("precopy", False, False, {}),
    ("converge", False, True, {"cpu-throttle-initial": 30, "cpu-throttle-increment": 20, "max-cpu-throttle": 99}),
    ("postcopy", True, False, {}),
    ("auto", False, True, {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}),
])
def test_what_each_strategy_starts_with(name: str, postcopy: bool, converge: bool, params: dict[str, int]) -> None:
    s: Strategy = strategy_named(name)(MigrationRequest("vm", "dst", strategy=name))
    assert (s.steers, s.postcopy(), s.converge(), s.throttle_parameters(True)) == (True, postcopy, converge, params)
    allowed = strategy_named("auto")(MigrationRequest("vm", "dst", allow_postcopy=True))
    assert allowed.postcopy() and not allowed.converge() and allowed.throttle_parameters(False) == {}
    assert not strategy_named("none")(MigrationRequest("vm")).steers
