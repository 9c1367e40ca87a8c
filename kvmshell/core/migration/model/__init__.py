"""The migration model, pure functions over samples: samples and traces, the prediction of
convergence, downtime and time left, the dirty rate as the range its measurement allows, and the
reports of recorded traces. No sockets, no monitor.

May import: ``core.values``, ``errors`` only.
"""
