"""Flax ports of Hugging Face causal LMs, one family per file."""
