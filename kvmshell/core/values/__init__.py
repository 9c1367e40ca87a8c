"""Pure values, no I/O: guest addresses, the typed models of what QEMU reports, migration URIs,
units (sizes, rates, seconds), QEMU command lines, the HMP text parsers, and the JSON form of
values (``jsonform``: numbers with their units in the key names).

May import: ``kvmshell.errors`` and the standard library only.
"""
