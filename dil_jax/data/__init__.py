"""Datasets, formats, batching and resumable iteration."""
