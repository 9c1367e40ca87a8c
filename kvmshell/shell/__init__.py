"""The prompt_toolkit face: `kvmshell shell`. No sockets, no qemu.qmp, no asyncssh.

May import: ``core.commands`` and the tiers below it; never ``kvmshell.tui`` or ``kvmshell.lab``.
"""
