"""Ray jobs for sweeps of BD3-LM evaluations: the only place ray is imported."""
