"""Everything that moves a guest: ``model/`` (pure: samples, the convergence model, reports),
``live/`` (the job between two endpoints, its stages, sampler, probe), TLS, static migration and
live migration to another host. Never knows the command language.

May import: ``core.monitor``, ``core.hosts``, ``config``, ``core.values``, ``errors``.
"""
