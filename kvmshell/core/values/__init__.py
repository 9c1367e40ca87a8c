"""Pure values, no I/O: guest addresses, the typed models of what QEMU reports, migration URIs,
units (sizes, rates, seconds), QEMU command lines and the HMP text parsers.

May import: ``kvmshell.errors`` and the standard library only.
"""
