"""Examples; a package so that ``examples.mixture_prior.two_gait_prior`` is an import
path a config can name (run from the repository root)."""
