"""Converters from foreign checkpoint formats into ours (never used on uploaded bytes)."""
