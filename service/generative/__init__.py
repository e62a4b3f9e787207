"""Generative serving on LLaVA: the M²PT prompt method, the generation engine, M²PT training."""
