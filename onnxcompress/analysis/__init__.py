"""Sensitivity analysis: per-layer sweeps for every method, executors (process pool, Ray), the disk cache."""
