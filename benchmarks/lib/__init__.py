"""Helpers the benchmarks share: the machine's description, result files, resumable rows."""
