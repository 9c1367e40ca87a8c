"""Shared fixtures: a Lab of real QEMU guests per test, and a guard that no QEMU outlives the suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest

from kvmshell.lab.launcher import Lab, leftover_lab_processes

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None and shutil.which("qemu-img") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64/qemu-img not installed (make test installs them)")


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    if not HAVE_QEMU:
        pytest.skip("qemu-system-x86_64 not installed (make test installs it)")
    async with Lab() as the_lab:
        yield the_lab


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> object:
    """Every migration leaves its trace in the state directory: the tests' go to a temporary one."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture(autouse=True, scope="session")
def no_qemu_left_behind() -> object:
    """Fail the run if any QEMU started by a Lab in this process tree is still alive at the end."""
    yield
    left = leftover_lab_processes(parent=os.getpid())
    assert not left, f"QEMU processes left running by the tests: {left}"
