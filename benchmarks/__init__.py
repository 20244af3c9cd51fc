"""Benchmarks of vaelab, run as modules from the repository root (see README.md here)."""
