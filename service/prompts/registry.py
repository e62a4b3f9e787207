"""ONE registry of the known prompt methods, by the name a checkpoint manifest uses.

Adding a method is one module and one line here (docs/ARCHITECTURE.md shows a worked example).
"""

from __future__ import annotations

from typing import Any

from service.errors import UnknownMethod
from service.prompts.bias import BiasTuning
from service.prompts.cocoop import CoCoOp
from service.prompts.coop import CoOp
from service.prompts.deep import IVLP, PromptSRC, VPTDeep
from service.prompts.dualview import DualView
from service.prompts.m2pt import M2PT
from service.prompts.maple import MaPLe
from service.prompts.method import Method
from service.prompts.zeroshot import ZeroShot

AnyMethod = Method[Any, Any, Any]

METHODS: dict[str, AnyMethod] = {
    m.name: m
    for m in (
        ZeroShot(),
        CoOp(),
        CoCoOp(),
        VPTDeep(),
        IVLP(),
        PromptSRC(),
        MaPLe(),
        BiasTuning(),
        DualView(),
        M2PT(),
    )
}


def get_method(name: str) -> AnyMethod:
    """The method registered under `name`, or UnknownMethod naming the known ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethod(
            f"unknown prompt method {name!r}; known methods: {', '.join(sorted(METHODS))}"
        ) from None


def trainable(task: str | None = None) -> list[str]:
    """Names of the methods with something to train (those serving `task`, if given)."""
    return sorted(n for n, m in METHODS.items() if m.trainable and task in (None, m.task))


def on_backbone(kind: str) -> list[str]:
    """Names of the methods whose checkpoints run on backbones of kind `kind`."""
    return sorted(n for n, m in METHODS.items() if m.backbone_kind == kind)
