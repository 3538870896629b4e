"""Benchmarks behind `stunet-scale bench ...`: each measures ours and the reference in one run."""
