"""Frozen backbones: open_clip CLIP (and, later, LLaVA)."""
