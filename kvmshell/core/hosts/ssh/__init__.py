"""SSH to the hosts: connections with host key verification, commands run there, channels and
forwards to monitors, SFTP; what a host key refusal of libvirt's SSH means (``libvirt_uri``). The only package that imports asyncssh (lazily: only a session that
reaches a host pays for the import), and every asyncssh exception becomes a kvmshell error here.

May import: ``core.values``, ``errors`` (not the rest of ``core.hosts``, which builds on it).
"""
