"""Shared fixtures: a Lab of real QEMU guests per test; tests/leakguard.py fails a test that leaves a
QEMU, sshd, libvirtd or network namespace of its own, and counts the tests that start a real QEMU."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest

from kvmshell.lab.launcher import Lab
from tests.accel import KVM_FOR_MARKED, choose_for_the_run

choose_for_the_run()        # before any Lab: TCG for the guests where /dev/kvm is kvm_pvm (tests/accel.py)

pytest_plugins = ["tests.leakguard", "tests.libvirtd"]

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None and shutil.which("qemu-img") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64/qemu-img not installed (make test installs them)")


@pytest.fixture
async def lab(request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    """A Lab; KVM for a test marked `kvm` where /dev/kvm opens (and KVMSHELL_ACCEL is not tcg)."""
    if not HAVE_QEMU:
        pytest.skip("qemu-system-x86_64 not installed (make test installs it)")
    accel = "kvm" if request.node.get_closest_marker("kvm") and KVM_FOR_MARKED else None
    async with Lab(accel=accel) as the_lab:
        yield the_lab


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> object:
    """Every migration leaves its trace in the state directory: the tests' go to a temporary one."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state

