"""Observe only: a plain `migrate URI` (or `trace`) that kvmshell follows without steering."""

from __future__ import annotations

from kvmshell.core.migration.live.strategies.base import Strategy


class Observe(Strategy):
    name = "none"
    summary = "follow the migration (sampling and the model only); set and steer nothing"
    offered = False
    steers = False
