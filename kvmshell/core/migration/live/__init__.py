"""A live migration kvmshell runs and steers: the job between two endpoints, the stages plugged into
it (disk copy over NBD, passthrough devices, notices), the sampler, the link probe, the endpoints'
URI and TLS, QEMU's blockers explained, and what the guest's pages and the hosts' CPU say about
sending fewer bytes (wiredata).

May import: ``core.migration.model``, ``core.migration`` (tls), ``core.monitor``, ``core.hosts``,
``config``, ``core.values``, ``errors``.
"""
