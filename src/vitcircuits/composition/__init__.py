"""Composition between attention heads: how much a later head reads what an earlier head writes."""
