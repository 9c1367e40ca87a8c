"""Bytes and hosts: streams to a monitor (unix, TCP, pty), SSH (the only asyncssh importer),
the pool of host connections, commands run here or on another host, and what runs there (QEMU
processes, their command lines, free ports).

May import: ``config``, ``core.values``, ``errors``.
"""
