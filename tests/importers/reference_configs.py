"""Every trainer config of the two reference repositories, what its run saves, and what the
importer must make of it. The values are read off configs/trainers/*.yaml (and, for CoOp, the
arguments scripts/coop/*.sh pass); docs/METHODS.md shows this table and a test keeps the two equal.

MPL = muzairkhattak/multimodal-prompt-learning, SRC = muzairkhattak/PromptSRC; "both" marks a
config file that is byte-identical in the two repositories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tests.importers.dassl_files import aggregate, frozen_clip, token_buffers
from tests.importers.reference import ref_image, ref_logits, ref_prompts, ref_text

# `git ls-tree HEAD configs/trainers` of each repository
MPL_CONFIGS = [
    *(f"CoCoOp/vit_b16_{c}_ep10_batch1" for c in ("c16", "c4", "c8")),
    "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1",
    *(f"CoOp/{c}" for c in ("rn101", "rn101_ep50", "rn50", "rn50_ctxv1", "rn50_ep100")),
    *(f"CoOp/{c}" for c in ("rn50_ep50", "rn50_ep50_ctxv1", "rn50_val", "vit_b16")),
    *(f"CoOp/{c}" for c in ("vit_b16_ep100", "vit_b16_ep50", "vit_b32", "vit_b32_ep50")),
    "IVLP/vit_b16_c2_ep5_batch4_2+2ctx",
    "IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only",
    "MaPLe/vit_b16_c2_ep5_batch4_2ctx",
    "MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
    "VPT/vit_b16_c2_ep5_batch4_4",
]
SRC_CONFIGS = [
    *(c for c in MPL_CONFIGS if c.startswith(("CoCoOp/", "CoOp/", "MaPLe/"))),
    "IVLP/vit_b16_c2_ep20_batch4_4+4ctx",
    "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx",
    "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",
    "PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot",
]
PHRASE = "a photo of a"


@dataclass
class Row:
    repo: str
    config: str
    backbone: str  # MODEL.BACKBONE.NAME
    settings: dict[str, Any]  # TRAINER.<trainer>.* (and OPTIM.MAX_EPOCH, GPA) that shape the file
    method: str  # what the importer detects
    expected: dict[str, Any]  # the method_config it writes
    note: str = ""
    run_dir: str = ""  # a scripts/coop/main.sh output directory the file sits in
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trainer(self) -> str:
        return self.config.split("/")[0]

    @property
    def id(self) -> str:
        return f"{self.repo}:{self.config}" + (f"[{self.run_dir}]" if self.run_dir else "")


def _coop(config, backbone, epochs, phrase="", n=16, csc=False, ctp="end", run_dir="", note=""):
    words = len(phrase.split()) if phrase else n
    settings = {"N_CTX": n, "CSC": csc, "CLASS_TOKEN_POSITION": ctp, "CTX_INIT": phrase}
    expected = {"n_ctx": words, "csc": csc and not phrase, "class_token_position": ctp}
    return Row("both", f"CoOp/{config}", backbone, settings | {"MAX_EPOCH": epochs}, "coop",
               expected | {"ctx_init": ""}, note, run_dir)  # fmt: skip


def _cocoop(config, n, phrase=""):
    settings = {"N_CTX": n, "CTX_INIT": phrase, "MAX_EPOCH": 10}
    words = len(phrase.split()) if phrase else n
    return Row("both", f"CoCoOp/{config}", "ViT-B/16", settings, "cocoop",
               {"n_ctx": words, "ctx_init": ""})  # fmt: skip


def _deep(repo, config, trainer_method, nv, nt, dv, dt, epochs, gpa=None):
    settings = {"N_CTX_VISION": nv, "N_CTX_TEXT": nt, "PROMPT_DEPTH_VISION": dv,
                "PROMPT_DEPTH_TEXT": dt, "CTX_INIT": PHRASE, "MAX_EPOCH": epochs}  # fmt: skip
    if gpa:
        settings |= {"GPA_MEAN": gpa[0], "GPA_STD": gpa[1]}
    expected = {"n_ctx_vision": nv if dv else 0, "depth_vision": dv, "n_ctx_text": nt,
                "depth_text": dt, "ctx_init": PHRASE}  # fmt: skip
    return Row(repo, config, "ViT-B/16", settings, trainer_method, expected)


def _maple(repo, config, depth, epochs):
    settings = {"N_CTX": 2, "CTX_INIT": PHRASE, "PROMPT_DEPTH": depth, "MAX_EPOCH": epochs}
    return Row(repo, config, "ViT-B/16", settings, "maple",
               {"n_ctx": 2, "depth": depth, "ctx_init": PHRASE})  # fmt: skip


SAME = "4 words, 4 tokens: served the same with or without --ctx-init"
ROWS = [
    _cocoop("vit_b16_c16_ep10_batch1", 16),
    _cocoop("vit_b16_c4_ep10_batch1", 4),
    _cocoop("vit_b16_c4_ep10_batch1_ctxv1", 4, PHRASE),
    _cocoop("vit_b16_c8_ep10_batch1", 8),
    _coop("rn101", "RN101", 200),
    _coop("rn101_ep50", "RN101", 50),
    _coop("rn50", "RN50", 200),
    _coop("rn50_ctxv1", "RN50", 200, PHRASE, note=SAME),
    _coop("rn50_ep100", "RN50", 100),
    _coop("rn50_ep50", "RN50", 50),
    _coop("rn50_ep50_ctxv1", "RN50", 50, PHRASE, note=SAME),
    _coop("rn50_val", "RN50", 10, note="no OPTIM section: Dassl's defaults, StepLR, no warmup"),
    _coop("vit_b16", "ViT-B/16", 200),
    _coop("vit_b16_ep100", "ViT-B/16", 100),
    _coop("vit_b16_ep50", "ViT-B/16", 50),
    _coop(
        "vit_b16_ep50",
        "ViT-B/16",
        50,
        n=8,
        csc=True,
        ctp="middle",
        run_dir="nctx8_cscTrue_ctpmiddle",
    ),
    _coop("vit_b16_ep50", "ViT-B/16", 50, n=4, ctp="front", run_dir="nctx4_cscFalse_ctpfront"),
    _coop("vit_b32", "ViT-B/32", 200),
    _coop("vit_b32_ep50", "ViT-B/32", 50),
    _deep("MPL", "IVLP/vit_b16_c2_ep5_batch4_2+2ctx", "ivlp", 2, 2, 12, 12, 5),
    _deep("MPL", "IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only", "ivlp", 0, 4, 0, 12, 5),
    _deep("SRC", "IVLP/vit_b16_c2_ep20_batch4_4+4ctx", "ivlp", 4, 4, 9, 9, 20),
    _maple("MPL", "MaPLe/vit_b16_c2_ep5_batch4_2ctx", 9, 5),
    _maple("SRC", "MaPLe/vit_b16_c2_ep5_batch4_2ctx", 9, 2),
    _maple("both", "MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets", 3, 2),
    Row(
        "MPL",
        "VPT/vit_b16_c2_ep5_batch4_4",
        "ViT-B/16",
        {"N_CTX_VISION": 8, "PROMPT_DEPTH_VISION": 12, "MAX_EPOCH": 5},
        "vpt",
        {"n_ctx_vision": 8, "depth_vision": 12},
    ),
    _deep("SRC", "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx", "promptsrc", 4, 4, 9, 9, 20, (15, 1)),
    _deep(
        "SRC",
        "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",
        "promptsrc",
        4,
        4,
        3,
        3,
        20,
        (6, 10),
    ),
    _deep(
        "SRC",
        "PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot",
        "promptsrc",
        4,
        4,
        9,
        9,
        50,
        (30, 30),
    ),
    _deep(
        "SRC",
        "PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot",
        "promptsrc",
        4,
        4,
        9,
        9,
        50,
        (45, 5),
    ),
]
ROWS[-1].note = "GPA_MEAN 45, GPA_STD 5: the config's commented alternative for 5 datasets"


def _value(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def render(row: Row) -> str:
    """The row as docs/METHODS.md shows it."""
    settings = ", ".join(f"{k} {_value(v)}" for k, v in row.settings.items())
    if row.run_dir:
        settings += f" (scripts/coop/main.sh, run directory `{row.run_dir}`)"
    imported = f"`{row.method}` " + ", ".join(f"{k} {_value(v)}" for k, v in row.expected.items())
    note = f" ({row.note})" if row.note else ""
    repo = {"MPL": "multimodal-prompt-learning", "SRC": "PromptSRC", "both": "both"}[row.repo]
    return f"| {repo} | {row.config} | {row.backbone} | {settings}{note} | {imported} |"


def _rnd(gen: torch.Generator, *shape: int, scale: float = 0.05) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).half()


def _prefix(row: Row, n: int) -> str:
    # every reference writes "X X ... X {class}." unless CTX_INIT is given (for the multimodal
    # trainers only when n <= 4)
    phrase = row.settings.get("CTX_INIT", "")
    multimodal = row.trainer not in ("CoOp", "CoCoOp")
    return phrase if phrase and (not multimodal or n <= 4) else ""


def build(row: Row, bb, classnames, gen) -> dict[str, torch.Tensor]:
    """The state dict the row's run saves (half precision where PREC fp16 makes it so)."""
    s, t, dt = row.settings, row.trainer, bb.text_width
    if t in ("CoOp", "CoCoOp"):
        n = len(s["CTX_INIT"].split()) if s["CTX_INIT"] else s["N_CTX"]
        csc = t == "CoOp" and s["CSC"] and not s["CTX_INIT"]
        state = {"ctx": _rnd(gen, len(classnames), n, dt) if csc else _rnd(gen, n, dt)}
        if t == "CoCoOp":
            e = bb.embed_dim
            state |= {
                "meta_net.linear1.weight": _rnd(gen, max(e // 16, 1), e, scale=1.0),
                "meta_net.linear1.bias": _rnd(gen, max(e // 16, 1)) + 1,
                "meta_net.linear2.weight": _rnd(gen, dt, max(e // 16, 1), scale=1.0),
                "meta_net.linear2.bias": _rnd(gen, dt),
            }
        return state | token_buffers(bb, classnames, n, _prefix(row, n))
    state = dict(frozen_clip(bb, zero_shot_tower=t == "PromptSRC"))
    dv = bb.vision_width
    nv, depth_v = s.get("N_CTX_VISION", 0), s.get("PROMPT_DEPTH_VISION", 0)
    if depth_v:
        state["image_encoder.VPT"] = _rnd(gen, nv, dv, scale=0.5).float()
    for i in range(1, depth_v):
        key = f"image_encoder.transformer.resblocks.{i}.VPT_shallow"
        state[key] = _rnd(gen, nv, dv, scale=0.5).float()
    if t == "VPT":
        return state
    n = s.get("N_CTX_TEXT", s.get("N_CTX"))
    state["prompt_learner.ctx"] = _rnd(gen, n, dt)
    state |= token_buffers(bb, classnames, n, _prefix(row, n), "prompt_learner.")
    if t == "MaPLe":
        pre = "prompt_learner.compound_prompt"
        state["prompt_learner.proj.weight"] = _rnd(gen, dv, dt, scale=0.5)
        state["prompt_learner.proj.bias"] = _rnd(gen, dv)
        for i in range(s["PROMPT_DEPTH"] - 1):
            state[f"{pre}s_text.{i}"] = _rnd(gen, n, dt, scale=0.5).float()
            state[f"{pre}_projections.{i}.weight"] = _rnd(gen, dv, dt, scale=0.5)
            state[f"{pre}_projections.{i}.bias"] = _rnd(gen, dv)
        return state
    for i in range(1, s["PROMPT_DEPTH_TEXT"]):
        key = f"text_encoder.transformer.resblocks.{i}.VPT_shallow"
        state[key] = _rnd(gen, n, dt, scale=0.5).float()
    if "GPA_MEAN" in s:  # PromptSRC writes the Gaussian aggregate of the whole state dict
        state = aggregate(state, s["MAX_EPOCH"], s["GPA_MEAN"], s["GPA_STD"])
    return state


def _deeper(state, tower, depth):
    key = "{}_encoder.transformer.resblocks.{}.VPT_shallow"
    return [state[key.format(tower, i)].float() for i in range(1, depth)]


@torch.no_grad()
def reference_logits(row: Row, state, bb, images, classnames) -> torch.Tensor:
    """The reference forward (tests/importers/reference.py) on the row's saved tensors."""
    m, tok, s, t = bb.model, bb.tokenizer, row.settings, row.trainer
    p = {k: v.float() for k, v in state.items()}
    if t == "CoOp":
        n = p["ctx"].shape[-2]
        phrase = _prefix(row, n) or " ".join(["X"] * n)
        prompts, tk = ref_prompts(
            m, tok, classnames, phrase, n, p["ctx"], s["CLASS_TOKEN_POSITION"]
        )
        return ref_logits(m, m.encode_image(images), ref_text(m, prompts, tk, []))
    if t == "CoCoOp":
        n = p["ctx"].shape[0]
        phrase = _prefix(row, n) or " ".join(["X"] * n)
        feats = F.normalize(m.encode_image(images), dim=-1)
        rows = []
        for f in feats:  # the reference loops over images
            h = F.relu(F.linear(f, p["meta_net.linear1.weight"], p["meta_net.linear1.bias"]))
            shift = F.linear(h, p["meta_net.linear2.weight"], p["meta_net.linear2.bias"])
            prompts, tk = ref_prompts(m, tok, classnames, phrase, n, p["ctx"] + shift)
            rows.append(ref_logits(m, f[None], ref_text(m, prompts, tk, []))[0])
        return torch.stack(rows)
    if t == "VPT":
        img = ref_image(
            m.visual, images, p["image_encoder.VPT"], _deeper(p, "image", s["PROMPT_DEPTH_VISION"])
        )
        txt = m.encode_text(tok([f"a photo of a {c.replace('_', ' ')}." for c in classnames]))
        return ref_logits(m, img, txt)
    ctx = p["prompt_learner.ctx"]
    n = ctx.shape[0]
    prompts, tk = ref_prompts(m, tok, classnames, _prefix(row, n) or " ".join(["X"] * n), n, ctx)
    if t == "MaPLe":
        pre = "prompt_learner.compound_prompt"
        deep_text = [p[f"{pre}s_text.{i}"] for i in range(s["PROMPT_DEPTH"] - 1)]
        deep_vis = [
            F.linear(x, p[f"{pre}_projections.{i}.weight"], p[f"{pre}_projections.{i}.bias"])
            for i, x in enumerate(deep_text)
        ]
        shared = F.linear(ctx, p["prompt_learner.proj.weight"], p["prompt_learner.proj.bias"])
        return ref_logits(
            m, ref_image(m.visual, images, shared, deep_vis), ref_text(m, prompts, tk, deep_text)
        )
    depth_v = s["PROMPT_DEPTH_VISION"]
    first = p["image_encoder.VPT"] if depth_v else None
    img = ref_image(m.visual, images, first, _deeper(p, "image", depth_v))
    return ref_logits(m, img, ref_text(m, prompts, tk, _deeper(p, "text", s["PROMPT_DEPTH_TEXT"])))
