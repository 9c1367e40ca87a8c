"""Live migration: samples, the convergence model (pure), strategies, and the job that runs them."""
