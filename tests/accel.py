"""Which accelerator the tests' guests run under.

Where /dev/kvm is the kvm_pvm flavour, the boot-sector guests run under TCG unless KVMSHELL_ACCEL says
otherwise: there SeaBIOS alone burns 4-6 s of CPU at each guest start (0.2 s under TCG), and that was
most of the suite's CPU (tests/test_scripts.py + test_static.py with 3 workers: 174 s of CPU under KVM,
81 s under TCG). Tests marked `kvm` (what only KVM shows) and the libvirt domains keep KVM there.
``KVMSHELL_ACCEL=kvm`` runs everything under KVM, ``=tcg`` everything under TCG.
"""

from __future__ import annotations

import os

from kvmshell.lab.launcher import kvm_usable
from kvmshell.lab.linuxguest import PVM_MODULE

_BY = "KVMSHELL_TESTS_TCG_FOR_PVM"      # set when this module chose TCG (xdist's workers inherit both)


def _forced() -> str:
    if os.environ.get(_BY) == "1":
        return ""
    return os.environ.get("KVMSHELL_ACCEL", "").strip().lower()


FORCED = _forced()
KVM_FOR_MARKED = FORCED != "tcg" and kvm_usable()
"""A test marked `kvm`, and a libvirt domain, run under KVM."""


def choose_for_the_run() -> None:
    """TCG for the lab's guests where /dev/kvm is kvm_pvm and nobody chose: KVMSHELL_ACCEL, for every
    Lab and every kvmshell the tests start."""
    if FORCED not in ("kvm", "tcg") and KVM_FOR_MARKED and PVM_MODULE.exists():
        os.environ["KVMSHELL_ACCEL"] = "tcg"
        os.environ[_BY] = "1"
