"""Bytes and hosts: streams to a monitor (unix, TCP, pty: ``streams``), SSH (``ssh``, the only
asyncssh importer), the pool of host connections (``pool``), commands run here or on another host
(``shell``), what runs there (``processes``: QEMU processes, their command lines, free ports), and who
holds a local monitor socket (``holder``: the peers of its connections).

May import: ``config``, ``core.values``, ``errors``.
"""
