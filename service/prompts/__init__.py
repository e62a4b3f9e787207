"""Prompt methods: the `Method` contract (method.py), the plans they materialize into (plans.py),
one module per method, and ONE registry (registry.py)."""

from service.prompts.method import Method, MethodConfig
from service.prompts.plans import PLAIN, Plan, ServingPlan, Signature
from service.prompts.registry import METHODS, get_method

__all__ = [
    "METHODS",
    "PLAIN",
    "Method",
    "MethodConfig",
    "Plan",
    "ServingPlan",
    "Signature",
    "get_method",
]
