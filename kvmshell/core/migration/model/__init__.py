"""The migration model, pure functions over samples: samples and traces, the prediction of
convergence, downtime and time left, the verdict said once it has held (hold), the dirty rate as the
range its measurement allows, the bytes on the wire of each way of sending fewer (wire), and the
reports of recorded traces. No sockets, no monitor.

May import: ``core.values``, ``errors`` only.
"""
