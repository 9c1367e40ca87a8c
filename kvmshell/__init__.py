"""kvmshell: a shell and a dashboard over the monitors of many QEMU/KVM guests.

The package is in tiers, each importing only the ones below it (tests/test_layers.py checks every
import): ``cli`` > ``shell`` | ``tui`` | ``lab`` > ``core.commands`` > ``core.migration`` >
``core.monitor`` > ``core.hosts`` > ``config`` > ``core.values`` > ``errors``. This module holds the
version only and imports nothing.
"""

__version__ = "0.1.0"
