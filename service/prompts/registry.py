"""The known prompt methods, by the name a checkpoint manifest uses."""

from __future__ import annotations

from service.errors import UnknownMethod
from service.prompts.base import PromptMethod
from service.prompts.bias import BiasTuning
from service.prompts.cocoop import CoCoOp
from service.prompts.coop import CoOp
from service.prompts.deep import IVLP, PromptSRC, VPTDeep
from service.prompts.dualview import DualView
from service.prompts.maple import MaPLe
from service.prompts.zeroshot import ZeroShot

METHODS: dict[str, PromptMethod] = {
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
    )
}


def get_method(name: str) -> PromptMethod:
    """The method registered under `name`, or UnknownMethod naming the known ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethod(
            f"unknown prompt method {name!r}; known methods: {', '.join(sorted(METHODS))}"
        ) from None
