"""The `Backbone` contract: what the engine, the API and checkpoint validation need to know of a
frozen model, whatever kind it is.

A backbone declares what it can serve (`capabilities`) instead of being probed for it: the
engine builds the classification path for a backbone that can `classify`, the generation path
for one that can `answer`, and routes of a capability the loaded backbone lacks answer 404
`wrong_backbone`. Each kind's own interface (CLIP's prompted towers, LLaVA's prompted prefill and
decode) stays on its class; the methods that run on a kind declare their parameters against it.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

import torch

Capability = Literal["classify", "embed", "answer"]


class Backbone(Protocol):
    """One frozen model, loaded once per process."""

    kind: ClassVar[str]  # the `--backbone` value that loads it, and what manifests' methods name
    title: ClassVar[str]  # how messages name it ("CLIP", "LLaVA")
    capabilities: ClassVar[frozenset[Capability]]
    model_name: str
    pretrained: str
    fingerprint: str  # hash of the weights: checkpoints trained on other weights are refused
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict[str, str]:
        """What /readyz and the start-up log say about the backbone."""
        ...
