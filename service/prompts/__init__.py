"""Prompt methods: each materializes its parameters into a `Plan` (see base.py)."""

from service.prompts.base import PLAIN, Plan, PromptMethod, Signature
from service.prompts.registry import METHODS, get_method

__all__ = ["METHODS", "PLAIN", "Plan", "PromptMethod", "Signature", "get_method"]
