"""The `Method` contract: everything a prompt method owns, in one place.

A method is one module and one registry line (registry.py). It declares which backbone kind it
runs on and which capability its plans serve, its hyperparameters (`Config`), the exact shapes of
its trainable tensors for a backbone, their initialization, how trained tensors `materialize`
into the plan the engine serves, its training objective and its default `recipe`, and (when the
reference code's checkpoints can be converted) its importer. Nothing outside the method's module
branches on its name: the trainer, the jobs, the CLI, validation and the engine read this
contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from service.backbones.base import Backbone, Capability
from service.errors import InvalidConfig
from service.prompts.plans import ServingPlan
from service.prompts.recipe import Recipe

Params = Mapping[str, Tensor]


class MethodConfig(BaseModel):
    """Base of every method's hyperparameters: unknown keys are errors, values are bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Step:
    """What one training batch yields."""

    loss: Tensor  # scalar, differentiable in the parameters
    correct: float  # hits of the prediction the loss trains (classes, answer tokens)
    count: int  # what `correct` (and the batch's mean loss) is over


class Objective(Protocol):
    """A method's training loss on one batch; built once per run, so it may cache what does not
    depend on the parameters (frozen text features, prompt embeddings)."""

    def step(self, params: dict[str, Tensor], batch: Any) -> Step:
        """The loss of `params` on `batch` (whatever the run's data yields for this method)."""
        ...


B = TypeVar("B", bound=Backbone, contravariant=True)
C = TypeVar("C", bound=MethodConfig)
P = TypeVar("P", bound=ServingPlan, covariant=True)
Cfg = TypeVar("Cfg", bound=MethodConfig)


class Method(Protocol[B, C, P]):
    """A prompt method on backbones of kind `backbone_kind`, materializing into plans `P`."""

    name: ClassVar[str]  # what manifests, jobs and the CLI call it
    backbone_kind: ClassVar[str]  # checkpoints of it validate only against this backbone kind
    task: ClassVar[Capability]  # what its plans serve: "classify" or "answer"
    source: ClassVar[str]  # the paper and reference code it follows

    @property
    def importer(self) -> Importer | None:
        """The hook converting its reference code's checkpoints, if any."""
        ...

    @property
    def proving_config(self) -> Mapping[str, Any]:
        """Config overrides for the proving ground's small CLIP (tests, demo, METHODS table)."""
        ...

    @property
    def recipe(self) -> Recipe | None:
        """The default training recipe; None: nothing to train."""
        ...

    @property
    def trainable(self) -> bool:
        """False for methods with nothing to train (zero-shot)."""
        ...

    def config(self, raw: Mapping[str, Any] | None = None) -> C:
        """Validated hyperparameters with the published defaults filled in (InvalidConfig)."""
        ...

    def shapes(self, backbone: B, cfg: C, classnames: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Name -> exact shape of every trainable tensor on this backbone."""
        ...

    def param_dtype(self, cfg: C) -> torch.dtype:
        """The dtype every tensor of its checkpoints is stored in (float32 unless the config
        keeps what a reference trained in bfloat16)."""
        ...

    def init(
        self, backbone: B, cfg: C, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        """Initial parameters, as the reference initializes them."""
        ...

    def materialize(
        self,
        params: Params,
        backbone: B,
        cfg: C,
        classnames: Sequence[str],
        templates: Sequence[str] = (),
    ) -> P:
        """The serving form of trained parameters, computed once per checkpoint version."""
        ...

    def objective(
        self,
        backbone: B,
        cfg: C,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> Objective:
        """The training loss of one run."""
        ...


class Importer(Protocol):
    """A method's hook for a reference implementation's checkpoint files: what its tensors mean
    and how they become the method's parameters (service/importers reads the files themselves;
    the hook's type says which reader: prompts/dassl.py's `DasslLayout`, M²PT's output)."""

    reference: ClassVar[str]  # whose files it reads


class MethodBase(Generic[Cfg]):
    """What every method shares: config validation and `trainable`."""

    name: ClassVar[str]
    Config: type[Cfg]
    recipe: ClassVar[Recipe | None] = None
    source: ClassVar[str] = ""
    importer: Importer | None = None  # converts the reference code's checkpoints, if any
    # config overrides for the proving ground's small CLIP (tests, demo, METHODS table): the
    # published defaults are tuned for ViT-B/16
    proving_config: ClassVar[Mapping[str, Any]] = {}

    @property
    def trainable(self) -> bool:
        """False for methods with nothing to train (zero-shot)."""
        return self.recipe is not None

    def param_dtype(self, cfg: Cfg) -> torch.dtype:
        """Checkpoints store float32 unless a method says otherwise."""
        return torch.float32

    def config(self, raw: Mapping[str, Any] | None = None) -> Cfg:
        """Validated config with the published defaults filled in."""
        try:
            return self.Config.model_validate(dict(raw or {}))
        except ValidationError as exc:
            raise InvalidConfig(f"invalid {self.name} config: {exc}") from exc
