"""Exporting must never touch the served backbone: its modules, weights and fingerprint."""

from __future__ import annotations

from service.backbones.clip import fingerprint_state
from service.engine.runtimes.onnx_export import fused_visual


def test_the_fused_copy_leaves_the_backbone_as_it_was(backbone):
    before = list(backbone.model.state_dict())
    blocks = list(backbone.visual.transformer.resblocks)
    fused = fused_visual(backbone.visual)
    assert fused is not backbone.visual  # the tiny CLIP's blocks are fusable
    assert type(fused.transformer.resblocks[0]).__name__ == "FusableBlock"
    assert list(backbone.visual.transformer.resblocks) == blocks
    assert list(backbone.model.state_dict()) == before
    assert fingerprint_state(backbone.model.state_dict()) == backbone.fingerprint
