"""The command language: one registry of specs read by every face, results, the session that plans
and runs lines, completion, and the handlers. A handler parses its line and makes its call below.

May import: ``core.migration``, ``core.monitor``, ``core.hosts``, ``config``, ``core.values``,
``errors``; never a UI library.
"""
