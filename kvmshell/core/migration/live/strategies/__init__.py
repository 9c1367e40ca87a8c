"""Migration strategies: one class in one file, behind the one interface of ``base.Strategy``.

A strategy says which capabilities and parameters a migration starts with and how it is steered on
each sample. A new strategy is a new module in this package with one ``Strategy`` subclass: it is
found by name (``strategy_named``), offered by `--strategy`, completion, the config and the
dashboard's dialog, with nothing else to change.

May import: ``core.migration.model``, ``core.values``, ``errors`` (the job it steers is passed in).
"""

from __future__ import annotations

import importlib
import pkgutil

from kvmshell.core.migration.live.strategies.base import Strategy


def _load() -> dict[str, type[Strategy]]:
    """Every Strategy subclass of the modules of this package, by name."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return {cls.name: cls for cls in Strategy.__subclasses__()}


_BY_NAME = _load()


def strategy_named(name: str) -> type[Strategy]:
    """The strategy called ``name``; ValueError naming the choices if there is none."""
    cls = _BY_NAME.get(name)
    if cls is None:
        raise ValueError(f"{name!r}: expected one of {', '.join(offered())}")
    return cls


def offered() -> tuple[str, ...]:
    """The names a user may pick (`--strategy`, the config, the dialog), the default first."""
    return tuple(c.name for c in sorted(_BY_NAME.values(), key=lambda c: (c.rank, c.name)) if c.offered)


def summaries() -> tuple[tuple[str, str], ...]:
    """(name, one line) of each offered strategy, for help, completion and the dialog."""
    return tuple((name, _BY_NAME[name].summary) for name in offered())


def parse_strategy(text: str) -> str:
    """A strategy name a user may pick, for a command line's parser (ValueError otherwise)."""
    if text not in offered():
        raise ValueError(f"{text!r}: expected one of {', '.join(offered())}")
    return text


__all__ = ["Strategy", "offered", "parse_strategy", "strategy_named", "summaries"]
