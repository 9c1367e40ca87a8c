"""Real QEMU guests on this machine for the demo, the tests and the benchmarks: the boot-sector
guest image, the launcher, network namespaces and the memory checks.

May import: ``core.commands`` and the tiers below it; never a face.
"""
