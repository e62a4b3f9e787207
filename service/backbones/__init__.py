"""Frozen backbones: the `Backbone` contract (base.py), CLIP and LLaVA, one loader (registry.py)."""
