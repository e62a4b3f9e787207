"""Which reference method wrote a Dassl state dict, decided from its whole key set.

What each reference trainer saves (keys after Dassl strips `module.`):
- CoOp, CoCoOp (KaiyangZhou/CoOp, and the copies in both muzairkhattak repositories) register
  the prompt learner alone: `ctx` (`[n, d]`, or `[C, n, d]` class-specific), CoCoOp's
  `meta_net.linear{1,2}.{weight,bias}`, and the buffers `token_prefix`, `token_suffix`.
- MaPLe, VPT, IVLP, PromptSRC register the whole model: their prompts
  (`prompt_learner.ctx`, `prompt_learner.proj.*`, `prompt_learner.compound_prompts_text.i`,
  `prompt_learner.compound_prompt_projections.i.*`, `image_encoder.VPT`,
  `{image,text}_encoder.transformer.resblocks.i.VPT_shallow`), the prompt learner's buffers
  (not VPT, which has no prompt learner) and the frozen CLIP (`image_encoder.*`,
  `text_encoder.*`, `logit_scale`); PromptSRC also a frozen CLIP image tower,
  `prompt_learner.ZS_image_encoder.*`.
A method *explains* a key set when every key is one it trains, one of its buffers or a frozen CLIP
tensor, and its required keys are there. PromptSRC always saves the frozen image tower with the
frozen CLIP, so a file with the frozen CLIP but without it is not PromptSRC's. Exactly one method
must explain the keys; when several do (files with the frozen weights stripped, or a whole-model
text-only file, which CoOp and one-layer language-only IVLP would both write), the importer asks
for `--method`, and a chosen method that leaves a tensor unused is an error naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from service.errors import ExtraTensor, InvalidCheckpoint, MalformedCheckpoint, MissingTensor

DEEP = re.compile(r"^(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
MAPLE_DEEP = re.compile(
    r"^prompt_learner\.compound_prompt(s_text\.\d+|_projections\.\d+\.(weight|bias))$"
)
ZS_PREFIX = "prompt_learner.ZS_image_encoder."
LEARNER = "prompt_learner."
METHODS = ("coop", "cocoop", "maple", "vpt", "ivlp", "promptsrc")
COCOOP_KEYS = (
    "ctx",
    "meta_net.linear1.weight",
    "meta_net.linear1.bias",
    "meta_net.linear2.weight",
    "meta_net.linear2.bias",
)


def backbone_key(key: str) -> str | None:
    """The open_clip name of a frozen CLIP tensor a whole-model reference saves, else None."""
    if key == "logit_scale":
        return key
    if key.startswith(ZS_PREFIX):
        return "visual." + key.removeprefix(ZS_PREFIX)
    if "VPT" in key:  # image_encoder.VPT and every VPT_shallow are prompts
        return None
    if key.startswith("image_encoder."):
        return "visual." + key.removeprefix("image_encoder.")
    if key.startswith("text_encoder."):
        return key.removeprefix("text_encoder.")
    return None


def _deep(keys: Iterable[str], tower: str) -> set[str]:
    return {k for k in keys if (m := DEEP.match(k)) and m.group(1) == tower}


def learner_prefix(method: str, keys: set[str]) -> str:
    """`prompt_learner.` for whole-model saves, "" for the prompt learner saved alone."""
    if method in ("coop", "cocoop"):
        return "" if "ctx" in keys else LEARNER
    return "" if method == "vpt" else LEARNER


def prompt_keys(method: str, keys: set[str]) -> tuple[set[str], list[str]]:
    """(the keys `method` trains that are present, the required ones that are missing)."""
    p = learner_prefix(method, keys)
    if method == "coop":
        required = [p + "ctx"]
        used = set(required)
    elif method == "cocoop":
        required = [p + k for k in COCOOP_KEYS]
        used = set(required)
    elif method == "maple":
        required = [p + k for k in ("ctx", "proj.weight", "proj.bias")]
        used = set(required) | {k for k in keys if MAPLE_DEEP.match(k)}
    elif method == "vpt":
        required = ["image_encoder.VPT"]
        used = set(required) | _deep(keys, "image")
    else:  # ivlp, promptsrc: the text context; vision prompts only when the vision depth is > 0
        required = [p + "ctx"]
        used = set(required) | {"image_encoder.VPT"} | _deep(keys, "image") | _deep(keys, "text")
    return used & keys, [k for k in required if k not in keys]


def unexplained(method: str, keys: set[str]) -> tuple[list[str], list[str]]:
    """(keys `method` would leave unused, required keys it misses), both sorted."""
    used, missing = prompt_keys(method, keys)
    p = learner_prefix(method, keys)
    buffers = set() if method == "vpt" else {p + "token_prefix", p + "token_suffix"}
    unused = []
    for k in keys - used - buffers:
        frozen = backbone_key(k)
        if frozen is None or (k.startswith(ZS_PREFIX) and method != "promptsrc"):
            unused.append(k)
    # trained tensors first: they are what a wrong method would drop
    return sorted(unused, key=lambda k: (backbone_key(k) is not None, k)), missing


def _saves_zero_shot_tower_if_frozen(method: str, keys: set[str]) -> bool:
    if method != "promptsrc":
        return True
    zs = any(k.startswith(ZS_PREFIX) for k in keys)
    frozen_clip = any(backbone_key(k) and not k.startswith(ZS_PREFIX) for k in keys)
    return zs or not frozen_clip


def candidates(keys: set[str]) -> list[str]:
    """Every method that explains the key set."""
    return [
        m
        for m in METHODS
        if not any(unexplained(m, keys)) and _saves_zero_shot_tower_if_frozen(m, keys)
    ]


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def choose_method(keys: Iterable[str], method: str | None = None) -> str:
    """The method that wrote these keys: `method` if it explains them, else the only candidate."""
    keys = set(keys)
    found = candidates(keys)
    if method is None:
        if len(found) == 1:
            return found[0]
        if found:
            raise InvalidCheckpoint(
                f"the tensors of this checkpoint could have been written by {' or '.join(found)}; "
                f"pass --method {' or --method '.join(found)}"
            )
        closest = min(METHODS, key=lambda m: len(unexplained(m, keys)[0]))
        unused, _ = unexplained(closest, keys)
        raise MalformedCheckpoint(
            "unrecognized checkpoint layout: no CoOp, CoCoOp, MaPLe, VPT, IVLP or PromptSRC "
            f"prompt learner uses all of its tensors (e.g. {_names(unused or sorted(keys))})"
        )
    if method not in METHODS:
        raise InvalidCheckpoint(f"no Dassl importer for method {method!r}")
    unused, missing = unexplained(method, keys)
    hint = f"; the tensors are those of {' or '.join(found)}" if found else ""
    if unused:
        raise ExtraTensor(f"{method} does not use tensor(s) {_names(unused)}{hint}")
    if missing:
        raise MissingTensor(f"{method} checkpoint lacks tensor(s) {_names(missing)}{hint}")
    if not _saves_zero_shot_tower_if_frozen(method, keys):
        raise InvalidCheckpoint(
            "promptsrc saves its frozen prompt_learner.ZS_image_encoder with the frozen CLIP; "
            f"this file has the frozen CLIP without it{hint}"
        )
    return method


def detect_method(keys: Iterable[str]) -> str:
    """Which reference method saved this state dict, from its whole key set."""
    return choose_method(keys)
