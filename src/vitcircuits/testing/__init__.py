"""Helpers for tests and benchmarks: checkpoint folders, fake hub caches, planted models."""
