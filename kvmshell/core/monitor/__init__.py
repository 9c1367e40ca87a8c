"""The only place that knows QMP from HMP: the ``Monitor`` interface with typed queries and
actions, its QMP (the only qemu.qmp importer) and HMP implementations, libvirt's (``libvirt``: the
monitor; ``libvirtconn``: the binding, connections and ``LibvirtDaemon`` for a static migration's save
image calls; ``libvirtdisk``: the destination's images for a disk copy; ``libvirtmig``: its
migrations' flags and statistics), the fleet of attached guests and the data
cached about them.

May import: ``core.hosts``, ``config``, ``core.values``, ``errors``.
"""
