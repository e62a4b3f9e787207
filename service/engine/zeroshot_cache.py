"""Ad-hoc zero-shot classifiers, cached by content (class names + templates).

Clients that send the same class names again (the common case) pay the text tower once. With a
`text_encoder` (the ONNX runtime's exported text tower) the class embeddings are computed there
instead of in eager torch, with the same template ensembling.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.checkpoints import check_classnames, check_templates
from service.errors import InvalidClassnames
from service.prompts.base import DEFAULT_TEMPLATES, Plan, normalize, readable
from service.prompts.registry import get_method


class ZeroShotCache:
    """LRU of materialized zero-shot plans keyed by normalized class names and templates."""

    def __init__(
        self,
        backbone: ClipBackbone,
        entries: int = 256,
        max_classes: int = 1000,
        text_encoder: Callable[[Tensor], Tensor] | None = None,
    ):
        self.backbone, self.entries, self.max_classes = backbone, entries, max_classes
        self.text_encoder = text_encoder
        self._plans: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], Plan] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def plan(self, classnames: Sequence[str], templates: Sequence[str] | None) -> Plan:
        """The zero-shot plan for these classes (validated; computed once per content)."""
        if len(classnames) > self.max_classes:
            raise InvalidClassnames(
                f"{len(classnames)} ad-hoc class names; at most {self.max_classes} per request "
                "(upload a checkpoint for larger label sets)"
            )
        names = tuple(check_classnames(list(classnames)))
        temps = tuple(check_templates(list(templates or ()))) or DEFAULT_TEMPLATES
        key = (names, temps)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return plan
            self.misses += 1
        plan = self._materialize(names, temps)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.entries:
                self._plans.popitem(last=False)
        return plan

    def _materialize(self, names: tuple[str, ...], temps: tuple[str, ...]) -> Plan:
        if self.text_encoder is None:
            method = get_method("zeroshot")
            return method.materialize({}, self.backbone, method.config(), names, temps)
        # CLIP's prompt ensembling, as `template_embeddings` does it, through the fast path.
        total: Tensor | None = None
        for template in temps:
            ids = self.backbone.tokenize([template.format(readable(c)) for c in names])
            feats = normalize(self.text_encoder(ids))
            total = feats if total is None else total + feats
        assert total is not None
        return Plan(
            labels=names,
            logit_scale=self.backbone.logit_scale,
            classes=normalize(total).to(self.backbone.device),
        )
