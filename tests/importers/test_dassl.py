"""Each importer converts a Dassl-layout state dict (reference key names and shapes, half
precision, with the frozen CLIP weights and token buffers the references save alongside) and the
imported checkpoint gives the reference forward's logits on the same backbone weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.checkpoints import materialize
from service.cli import main
from service.engine.forward import classify
from service.errors import ExtraTensor, InvalidContent, MalformedCheckpoint
from service.importers.dassl import detect_method, import_dassl
from service.importers.layouts import backbone_key
from tests.conftest import CLASSNAMES
from tests.importers.dassl_files import frozen_clip, save_dassl, token_buffers
from tests.importers.reference import ref_image, ref_logits, ref_prompts, ref_text

G = torch.Generator().manual_seed(42)
BUFFERS = {p + b for p in ("", "prompt_learner.") for b in ("token_prefix", "token_suffix")}


def rnd(*shape):
    return (torch.randn(*shape, generator=G) * 0.05).half()


def _save(tmp_path, state, name="model.pth.tar-5", epoch=5):
    """A Dassl-written file: the prompts are what its SGD optimizes, frozen tensors are not."""
    trainable = [k for k in state if k not in BUFFERS and backbone_key(k) is None]
    return save_dassl(tmp_path / name, state, trainable, epoch)


def _frozen_clip_keys(backbone, classnames=CLASSNAMES, n_ctx=2, phrase="a photo of a"):
    """What the whole-model references also save: the frozen CLIP and the prompt buffers."""
    return {
        **frozen_clip(backbone),
        **token_buffers(backbone, classnames, n_ctx, phrase, prefix="prompt_learner."),
    }


def _ours(backbone, ckpt, images):
    plan = materialize(ckpt, backbone)
    return torch.stack(classify(backbone, images, [plan] * len(images)))


def _tok(backbone):
    return backbone.tokenizer


def _f(t):
    return t.float()


def test_coop(backbone, images, classnames, tmp_path):
    ctx = rnd(16, backbone.text_width)
    state = {"ctx": ctx, **token_buffers(backbone, classnames, 16)}
    ckpt, _ = import_dassl(
        _save(tmp_path, state), name="pets", classnames=classnames, backbone=backbone
    )
    assert ckpt.manifest.method == "coop" and ckpt.params["ctx"].dtype == torch.float32
    m = backbone.model
    prompts, tokenized = ref_prompts(
        m, _tok(backbone), classnames, " ".join(["X"] * 16), 16, _f(ctx)
    )
    ref = ref_logits(m, m.encode_image(images), ref_text(m, prompts, tokenized, []))
    assert (_ours(backbone, ckpt, images) - ref).abs().max() <= 1e-4


def test_coop_class_specific(backbone, images, classnames, tmp_path):
    ctx = rnd(len(classnames), 8, backbone.text_width)
    ckpt, _ = import_dassl(
        _save(tmp_path, {"ctx": ctx}),
        name="csc",
        classnames=classnames,
        backbone=backbone,
        method="coop",
    )
    assert ckpt.manifest.method_config["csc"] is True
    m = backbone.model
    prompts, tokenized = ref_prompts(m, _tok(backbone), classnames, "X " * 7 + "X", 8, _f(ctx))
    ref = ref_logits(m, m.encode_image(images), ref_text(m, prompts, tokenized, []))
    assert (_ours(backbone, ckpt, images) - ref).abs().max() <= 1e-4


def test_cocoop(backbone, images, classnames, tmp_path):
    e, d = backbone.embed_dim, backbone.text_width
    state = {
        "ctx": rnd(4, d),
        "meta_net.linear1.weight": rnd(e // 16, e) * 20,
        "meta_net.linear1.bias": rnd(e // 16) + 1,
        "meta_net.linear2.weight": rnd(d, e // 16) * 20,
        "meta_net.linear2.bias": rnd(d),
        **token_buffers(backbone, classnames, 4),
    }
    ckpt, _ = import_dassl(
        _save(tmp_path, state), name="cocoop", classnames=classnames, backbone=backbone
    )
    assert ckpt.manifest.method == "cocoop"
    m = backbone.model
    imf = F.normalize(m.encode_image(images), dim=-1)
    rows = []
    for i in range(len(images)):  # the reference loops over images
        h = F.relu(
            F.linear(
                imf[i], _f(state["meta_net.linear1.weight"]), _f(state["meta_net.linear1.bias"])
            )
        )
        shift = F.linear(
            h, _f(state["meta_net.linear2.weight"]), _f(state["meta_net.linear2.bias"])
        )
        ctx_i = _f(state["ctx"]) + shift
        prompts, tokenized = ref_prompts(m, _tok(backbone), classnames, "X X X X", 4, ctx_i)
        rows.append(ref_logits(m, imf[i : i + 1], ref_text(m, prompts, tokenized, []))[0])
    assert (_ours(backbone, ckpt, images) - torch.stack(rows)).abs().max() <= 1e-4


@pytest.mark.parametrize("depth", [1, 3])
def test_maple(backbone, images, classnames, tmp_path, depth):
    dt, dv, n = backbone.text_width, backbone.vision_width, 2
    state = {
        "prompt_learner.ctx": rnd(n, dt),
        "prompt_learner.proj.weight": rnd(dv, dt) * 10,
        "prompt_learner.proj.bias": rnd(dv),
        **_frozen_clip_keys(backbone, classnames, n),
    }
    for i in range(depth - 1):
        state[f"prompt_learner.compound_prompts_text.{i}"] = rnd(n, dt) * 10
        state[f"prompt_learner.compound_prompt_projections.{i}.weight"] = rnd(dv, dt) * 10
        state[f"prompt_learner.compound_prompt_projections.{i}.bias"] = rnd(dv)
    ckpt, _ = import_dassl(
        _save(tmp_path, state),
        name="maple",
        classnames=classnames,
        backbone=backbone,
        method="maple",
    )
    assert ckpt.manifest.method_config["depth"] == depth
    m, p = backbone.model, {k: _f(v) for k, v in state.items()}
    shared = F.linear(
        p["prompt_learner.ctx"], p["prompt_learner.proj.weight"], p["prompt_learner.proj.bias"]
    )
    text_deep = [p[f"prompt_learner.compound_prompts_text.{i}"] for i in range(depth - 1)]
    vis_deep = [
        F.linear(
            text_deep[i],
            p[f"prompt_learner.compound_prompt_projections.{i}.weight"],
            p[f"prompt_learner.compound_prompt_projections.{i}.bias"],
        )
        for i in range(depth - 1)
    ]
    # n_ctx=2 <= 4 with CTX_INIT "a photo of a": the prompt text is the phrase itself
    prompts, tokenized = ref_prompts(
        m, _tok(backbone), classnames, "a photo of a", n, p["prompt_learner.ctx"]
    )
    ref = ref_logits(
        m, ref_image(m.visual, images, shared, vis_deep), ref_text(m, prompts, tokenized, text_deep)
    )
    assert (_ours(backbone, ckpt, images) - ref).abs().max() <= 1e-4


def _deep_state(backbone, n_v, depth_v, n_t=0, depth_t=0, zs=False):
    state = dict(frozen_clip(backbone, zero_shot_tower=zs))
    if depth_v:
        state["image_encoder.VPT"] = rnd(n_v, backbone.vision_width).float() * 10
    for i in range(1, depth_v):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = (
            rnd(n_v, backbone.vision_width).float() * 10
        )
    if depth_t:
        state["prompt_learner.ctx"] = rnd(n_t, backbone.text_width)
        state |= token_buffers(backbone, CLASSNAMES, n_t, "a photo of a", "prompt_learner.")
        for i in range(1, depth_t):
            state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = (
                rnd(n_t, backbone.text_width).float() * 10
            )
    return state


def _deep_lists(state, tower, depth):
    return [
        state[f"{tower}_encoder.transformer.resblocks.{i}.VPT_shallow"].float()
        for i in range(1, depth)
    ]


def test_vpt_deep(backbone, images, classnames, tmp_path):
    state = _deep_state(backbone, n_v=8, depth_v=3)
    ckpt, _ = import_dassl(
        _save(tmp_path, state), name="vpt", classnames=classnames, backbone=backbone
    )
    assert ckpt.manifest.method == "vpt" and ckpt.manifest.templates == ["a photo of a {}."]
    m = backbone.model
    img = ref_image(
        m.visual, images, _f(state["image_encoder.VPT"]), _deep_lists(state, "image", 3)
    )
    txt = m.encode_text(
        _tok(backbone)([f"a photo of a {c.replace('_', ' ')}." for c in classnames])
    )
    assert (_ours(backbone, ckpt, images) - ref_logits(m, img, txt)).abs().max() <= 1e-4


@pytest.mark.parametrize("method, n, depth", [("ivlp", 2, 3), ("promptsrc", 4, 2)])
def test_ivlp_and_promptsrc(backbone, images, classnames, tmp_path, method, n, depth):
    state = _deep_state(backbone, n, depth, n, depth, zs=method == "promptsrc")
    ckpt, _ = import_dassl(
        _save(tmp_path, state), name=method, classnames=classnames, backbone=backbone
    )
    assert ckpt.manifest.method == method
    m = backbone.model
    img = ref_image(
        m.visual, images, _f(state["image_encoder.VPT"]), _deep_lists(state, "image", depth)
    )
    prompts, tokenized = ref_prompts(
        m, _tok(backbone), classnames, "a photo of a", n, _f(state["prompt_learner.ctx"])
    )
    txt = ref_text(m, prompts, tokenized, _deep_lists(state, "text", depth))
    assert (_ours(backbone, ckpt, images) - ref_logits(m, img, txt)).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["ivlp", "promptsrc"])
def test_language_only_ivlp(backbone, images, classnames, tmp_path, method):
    """PROMPT_DEPTH_VISION 0 (the `_4ctx_language_only` config): deep text prompts, no vision
    prompt at all. Detected as IVLP (PromptSRC with its frozen image tower), every text prompt
    kept, the image side the plain encoder, logits as the reference's."""
    n, depth = 4, 3
    state = _deep_state(backbone, 0, 0, n, depth, zs=method == "promptsrc")
    assert not any(k.startswith("image_encoder.") and "VPT" in k for k in state)
    ckpt, _ = import_dassl(
        _save(tmp_path, state), name="lp", classnames=classnames, backbone=backbone
    )
    cfg = ckpt.manifest.method_config
    assert ckpt.manifest.method == method
    assert (cfg["depth_vision"], cfg["n_ctx_vision"], cfg["depth_text"]) == (0, 0, depth)
    assert set(ckpt.params) == {"text_ctx"}
    plan = materialize(ckpt, backbone)
    assert plan.vision_tokens is None
    m = backbone.model
    prompts, tokenized = ref_prompts(
        m, _tok(backbone), classnames, "a photo of a", n, _f(state["prompt_learner.ctx"])
    )
    txt = ref_text(m, prompts, tokenized, _deep_lists(state, "text", depth))
    img = ref_image(m.visual, images, None, [])
    assert (_ours(backbone, ckpt, images) - ref_logits(m, img, txt)).abs().max() <= 1e-4
    # what the issue saw: read as CoOp, the 2 deeper text prompts would be dropped
    with pytest.raises(ExtraTensor, match=r"coop does not use tensor.*VPT_shallow"):
        import_dassl(
            _save(tmp_path, state), name="lp", classnames=classnames, backbone=backbone,
            method="coop",
        )  # fmt: skip


def test_layout_is_detected_from_keys_not_flags(backbone, classnames, tmp_path):
    state = _deep_state(backbone, 2, 2, 2, 2)
    assert detect_method(state) == "ivlp"
    with pytest.raises(ExtraTensor, match=r"maple does not use tensor.*those of ivlp"):
        import_dassl(
            _save(tmp_path, state),
            name="x",
            classnames=classnames,
            backbone=backbone,
            method="maple",
        )
    with pytest.raises(MalformedCheckpoint, match="unrecognized"):
        detect_method({"foo": torch.zeros(1)})


def test_cli_import_writes_a_loadable_checkpoint(backbone, classnames, tmp_path, monkeypatch):
    src = _save(tmp_path, {"ctx": rnd(4, backbone.text_width)})
    (tmp_path / "classes.txt").write_text("\n".join(classnames))
    out = tmp_path / "pets.safetensors"
    monkeypatch.setattr("service.cli.load_backbone", lambda settings: backbone)
    code = main(
        [
            "import",
            str(src),
            "--method",
            "coop",
            "--name",
            "pets",
            "--classnames",
            str(tmp_path / "classes.txt"),
            "--out",
            str(out),
            "--pretrained",
            "none",
        ]
    )
    assert code == 0 and out.exists()
    from service.checkpoints import load

    assert load(out.read_bytes(), backbone).manifest.classnames == classnames


def test_coop_phrase_with_more_tokens_than_words(backbone, images, classnames, tmp_path):
    """CTX_INIT "itap of a": 3 words (the context) but 4 BPE tokens; the extra token stays fixed
    in the prompt, as in the reference (found by running the reference code itself)."""
    ctx = rnd(3, backbone.text_width)
    path = _save(tmp_path, {"ctx": ctx})
    ckpt, _ = import_dassl(
        path, name="itap", classnames=classnames, backbone=backbone, ctx_init="itap of a"
    )
    m = backbone.model
    prompts, tokenized = ref_prompts(m, _tok(backbone), classnames, "itap of a", 3, _f(ctx))
    ref = ref_logits(m, m.encode_image(images), ref_text(m, prompts, tokenized, []))
    assert (_ours(backbone, ckpt, images) - ref).abs().max() <= 1e-4
    with pytest.raises(InvalidContent, match="3 context vectors"):
        import_dassl(
            path, name="itap", classnames=classnames, backbone=backbone, ctx_init="a photo of a"
        )
