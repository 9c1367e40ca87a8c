"""Everything that moves a guest: ``model/`` (pure: samples, the convergence model, reports),
``live/`` (the job between two endpoints, its stages, sampler, probe), TLS, static migration and
live migration to another host, and what those two share: ``twin`` (a QEMU started on a host from a
guest's command line, and its undo), ``images`` (backing chains read on a host), ``ledger`` (what was
done, undone and kept), ``history`` (every migration's trace and summary in the state directory),
``tcgdirty`` (the warning before migrating a guest that QEMU's TCG dirty-tracking bug can corrupt),
``libvirtmove`` (a libvirt guest's live migration through libvirt, with the job on top),
``libvirtsave`` (a libvirt guest's static migration: libvirt's save image, copied, restored there).
Never knows the command language.

May import: ``core.monitor``, ``core.hosts``, ``config``, ``core.values``, ``errors``.
"""
