"""The frozen CLIP tensors a reference file carries: ignored (with a note of the largest
difference) within the stated bound of the served backbone, refused by name beyond it."""

from __future__ import annotations

import logging

import pytest
import torch

from service.errors import BackboneMismatch
from service.importers.dassl import import_dassl
from service.importers.frozen import averaged_epochs, check_frozen
from tests.importers.dassl_files import aggregate, frozen_clip, save_dassl, token_buffers

# PromptSRC's GPA schedules: (MAX_EPOCH, GPA_MEAN, GPA_STD) of its base-to-novel,
# cross-dataset and the two few-shot settings
SCHEDULES = [(20, 15, 1), (20, 6, 10), (50, 30, 30), (50, 45, 5)]


def _promptsrc_state(backbone, classnames):
    return {
        **frozen_clip(backbone, zero_shot_tower=True),
        **token_buffers(backbone, classnames, 4, "a photo of a", "prompt_learner."),
        "prompt_learner.ctx": torch.randn(4, backbone.text_width).half(),
    }


@pytest.mark.parametrize("epochs, mean, std", SCHEDULES)
def test_gaussian_aggregation_is_within_the_bound(backbone, classnames, caplog, epochs, mean, std):
    averaged = aggregate(_promptsrc_state(backbone, classnames), epochs, mean, std)
    with caplog.at_level(logging.INFO, logger="service.importers.frozen"):
        found = check_frozen(averaged, backbone, "promptsrc", epochs)
    assert found.tensors > 80 and found.max_diff > 0 and found.max_fraction <= 1
    assert "largest difference" in caplog.text and found.worst in caplog.text


def test_bound_holds_on_the_hardest_values():
    """The bound against the aggregation itself, on fp16 values across the whole range (large,
    ordinary, tiny and subnormal), for every PromptSRC schedule."""
    g = torch.Generator().manual_seed(0)
    w = torch.cat(
        [torch.randn(200_000, generator=g) * s for s in (0.02, 2.0, 1e-4, 1e-6)]
        + [torch.tensor([6.0e4, -6.0e4, 2.0**-24, 0.0])]
    ).half()
    u, s = 2.0**-11, 2.0**-24
    for epochs, mean, std in SCHEDULES:
        averaged = aggregate({"x": w}, epochs, mean, std)["x"].float()
        bound = (epochs + 1) * u * w.float().abs() + epochs * s
        assert ((averaged - w.float()).abs() <= bound).all()
        assert ((averaged - w.float()).abs() > 2 * u * w.float().abs() + s).any()  # N matters


def test_beyond_the_bound_is_refused_naming_the_tensor(backbone, classnames):
    state = aggregate(_promptsrc_state(backbone, classnames), 20, 15, 1)
    key = "text_encoder.transformer.resblocks.1.mlp.c_fc.weight"
    served = backbone.model.state_dict()["transformer.resblocks.1.mlp.c_fc.weight"].half().float()
    bound = 21 * 2.0**-11 * served.abs() + 20 * 2.0**-24
    state[key] = state[key].clone()
    state[key].view(-1)[7] = (served.view(-1)[7] + 3 * bound.view(-1)[7]).half()
    with pytest.raises(BackboneMismatch, match=rf"{key}.*element 7"):
        check_frozen(state, backbone, "promptsrc", 20)


def test_exact_copies_get_one_unit_in_the_last_place(backbone, classnames):
    state = {**frozen_clip(backbone), "prompt_learner.ctx": torch.zeros(2, 48)}
    assert check_frozen(state, backbone, "ivlp", 5).max_diff == 0.0
    assert averaged_epochs("ivlp", 5) == 1 and averaged_epochs("promptsrc", 5) == 5
    assert averaged_epochs("promptsrc", None) == 50
    # what GPA over 20 epochs does is far more than one copy's rounding
    averaged = aggregate(_promptsrc_state(backbone, classnames), 20, 6, 10)
    del averaged["prompt_learner.ctx"]
    with pytest.raises(BackboneMismatch, match="1 averaged epoch"):
        check_frozen(averaged, backbone, "ivlp", 20)


def test_another_backbone_is_refused(backbone, other_backbone, classnames, tmp_path):
    state = {
        **frozen_clip(other_backbone),
        **token_buffers(other_backbone, classnames, 2, "a photo of a", "prompt_learner."),
        "prompt_learner.ctx": torch.randn(2, 48).half(),
        "image_encoder.VPT": torch.randn(2, 64),
    }
    path = save_dassl(
        tmp_path / "m.pth.tar-5", state, ["prompt_learner.ctx", "image_encoder.VPT"], 5
    )
    with pytest.raises(BackboneMismatch, match="differs from the served backbone"):
        import_dassl(path, name="x", classnames=classnames, backbone=backbone)
    import_dassl(path, name="x", classnames=classnames, backbone=other_backbone)  # its own: fine


def test_coop_context_from_another_backbone_is_refused(
    backbone, other_backbone, classnames, tmp_path
):
    """CoOp saves no frozen CLIP; its `token_prefix` (the start-of-text embedding) still tells
    the backbone apart: the same context shape fits any CLIP of the same text width."""
    state = {"ctx": torch.randn(4, 48).half(), **token_buffers(other_backbone, classnames, 4)}
    path = save_dassl(tmp_path / "m.pth.tar-50", state, ["ctx"], 50)
    with pytest.raises(BackboneMismatch, match="'token_prefix'"):
        import_dassl(path, name="x", classnames=classnames, backbone=backbone)
    ckpt, _ = import_dassl(path, name="x", classnames=classnames, backbone=other_backbone)
    assert ckpt.manifest.method == "coop"


def test_a_tensor_the_served_backbone_lacks_is_refused(backbone):
    state = {"image_encoder.attnpool.c_proj.weight": torch.zeros(4, 4).half()}
    with pytest.raises(BackboneMismatch, match=r"attnpool.*no counterpart"):
        check_frozen(state, backbone, "vpt")
    state = {"image_encoder.conv1.weight": torch.zeros(4, 4).half()}
    with pytest.raises(BackboneMismatch, match=r"conv1.weight' has shape \[4, 4\]"):
        check_frozen(state, backbone, "vpt")
