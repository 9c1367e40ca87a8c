"""The textual face: `kvmshell tui`. No sockets, no qemu.qmp, no asyncssh.

May import: ``core.commands`` and the tiers below it; never ``kvmshell.shell`` or ``kvmshell.lab``.
"""
