"""Helpers for tests and benchmarks: checkpoint folders in timm hub layout."""
