"""Bytes and hosts: streams to a monitor (unix, TCP, pty: ``streams``), SSH (``ssh``, the only
asyncssh importer), the pool of host connections (``pool``), commands run here or on another host
(``shell``), and what runs there (``processes``: QEMU processes, their command lines, free ports).

May import: ``config``, ``core.values``, ``errors``.
"""
