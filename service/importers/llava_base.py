"""`promptserve convert-base`: the LLaVA v1 base M²PT trains on -> the served base format.

M²PT's official recipe (`scripts/PT_full_schedule.sh`) trains on Vicuna-7B-v1.3
(`--model_name_or_path`), CLIP ViT-L/14 at 224 px (`--vision_tower`), LLaVA v1's one-Linear
projector from the pretrain release (`--pretrain_mm_mlp_adapter .../mm_projector.bin`), patch
features of layer -2. The served format is a directory `from_pretrained` reads: transformers'
`LlavaForConditionalGeneration` and its processor. One command assembles it from

* SRC: a LLaVA v1-layout directory (config.json, weights, tokenizer): Vicuna itself, a LLaVA v1
  release, or the reference's saved whole model (llava_files.py has the key names);
* `--vision-tower DIR`: the CLIP release (config, weights, image processor). Always from there:
  a saved run's copy of the tower is its bf16 cast, and its config does not say the tower's
  shape (heads);
* `--projector FILE`: an `mm_projector.bin` (or any file with `model.mm_projector.*`), when SRC
  has none or holds a run's trained one;
* `--lm-head FILE`: a weights file with `lm_head.weight` (the reference re-creates the head from
  Vicuna's `pytorch_model-00002-of-00002.bin`), when SRC holds a run's trained head.

LLaVA v1's one Linear is stored as transformers' two-layer projector with a linear activation
and an identity second layer, exactly equal to it (the backbone skips the identity). `<image>` is
added to the tokenizer as a placeholder id past the vocabulary (the embeddings keep their
shape: image positions are filled with image features, never looked up). A mismatch between the
pieces (widths, vocabulary) is an error naming it. Prompts in SRC (a run's) are not the base's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg
from torch import Tensor

from service.backbones.clip import fingerprint_state
from service.backbones.conversation import TEMPLATES, jinja
from service.errors import BackboneMismatch, InvalidContent
from service.importers import llava_files
from service.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NOT_LLAMA = ("architectures", "model_type", "_name_or_path", "torch_dtype", "transformers_version")
MARKER = "promptserve-base.json"


def _llm_state(src: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """SRC's language model (+ head) and projector tensors, in LLaVA v1 names; prompts and the
    tower's copy left out (counted)."""
    llm: dict[str, Tensor] = {}
    projector: dict[str, Tensor] = {}
    skipped = 0
    for key, tensor in llava_files.read_all(src):
        if key.endswith(
            ".inv_freq"
        ):  # rotary frequencies: derived, never stored by the served model
            continue
        if key.startswith(llava_files.PROJECTOR_PREFIX):
            projector[key] = tensor
        elif key.startswith(llava_files.VISION_PREFIX) or ".prompts." in key:
            skipped += 1
        elif key.startswith("model.") or key == "lm_head.weight":
            llm[key] = tensor
    return llm, projector, skipped


def _file_tensors(path: Path, prefix: str) -> dict[str, Tensor]:
    found = {k: v for k, v in llava_files.tensors(path) if k.startswith(prefix)}
    if not found:
        raise InvalidContent(f"{path} holds no {prefix}* tensors")
    return found


def _config(src: Path, vision_tower: Path, one_linear: bool) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    raw = llava_files.config(src)
    if not raw.get("hidden_size"):
        raise InvalidContent(f"{src}/config.json is missing or not a LLaMA config")
    text = LlamaConfig(
        **{k: v for k, v in raw.items() if k not in NOT_LLAMA and not k.startswith("mm_")}
    )
    vision = CLIPVisionConfig.from_pretrained(str(vision_tower))
    if raw.get("mm_hidden_size") not in (None, vision.hidden_size):
        raise BackboneMismatch(
            f"{src} was built for a vision tower of width {raw['mm_hidden_size']}; "
            f"{vision_tower} has {vision.hidden_size}"
        )
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise InvalidContent(f"unknown mm_vision_select_feature {select!r}")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="linear" if one_linear else "gelu",
        multimodal_projector_bias=True,
    )


def convert_base(
    src: str | Path,
    out: str | Path,
    *,
    vision_tower: str | Path,
    projector: str | Path | None = None,
    lm_head: str | Path | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Write the served base to `out`; returns what it is (also saved as promptserve-base.json)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    src, out, vision_tower = Path(src), Path(out), Path(vision_tower)
    if dtype != "auto" and dtype not in DTYPES:
        raise InvalidContent(f"--dtype must be auto or one of {', '.join(DTYPES)}")
    llm, proj, skipped = _llm_state(src)
    if "model.embed_tokens.weight" not in llm or "lm_head.weight" not in llm:
        raise InvalidContent(f"{src} holds no language model (model.embed_tokens, lm_head)")
    if projector is not None:
        proj = _file_tensors(Path(projector), llava_files.PROJECTOR_PREFIX)
    if not proj:
        raise InvalidContent(
            f"{src} has no mm_projector; pass --projector FILE (the LLaVA v1 pretrain release's "
            "mm_projector.bin, what M2PT's --pretrain_mm_mlp_adapter loads)"
        )
    if lm_head is not None:
        llm["lm_head.weight"] = _file_tensors(Path(lm_head), "lm_head.weight")["lm_head.weight"]
    one_linear = set(proj) == {"model.mm_projector.weight", "model.mm_projector.bias"}
    config = _config(src, vision_tower, one_linear)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what the reference's v1 recipe sets
    config.image_token_id = int(tokenizer.get_vocab()["<image>"])
    target = DTYPES[dtype] if dtype != "auto" else llm["model.embed_tokens.weight"].dtype
    tower = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=torch.float32).state_dict()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    served = model.state_dict()
    state: dict[str, Tensor] = {}
    for key, tensor in [*llm.items(), *proj.items()]:
        name = llava_files.served_key(key, served)
        if name is None:
            raise InvalidContent(f"{src}: {key} has no place in a LLaVA model")
        state[name] = tensor
    for key, tensor in tower.items():
        name = llava_files.served_key(llava_files.VISION_PREFIX + key, served)
        if name is not None:
            state[name] = tensor
    if one_linear:  # LLaVA v1's one Linear, exactly: linear activation, identity second layer
        width = config.text_config.hidden_size
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(width)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(width)
    missing = sorted(set(served) - set(state))
    if missing:
        raise InvalidContent(f"the pieces given lack {', '.join(missing[:5])} ({len(missing)})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(served[name].shape):
            raise BackboneMismatch(
                f"{name}: {list(tensor.shape)} from the pieces given, the assembled LLaVA needs "
                f"{list(served[name].shape)} (language model, tower and projector must match)"
            )
    state = {k: v.to(target).contiguous() for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    image_processor = CLIPImageProcessor.from_pretrained(str(vision_tower))
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=jinja(TEMPLATES["llava_v1"]),
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    summary = {
        "fingerprint": fingerprint_state({k: v.float() for k, v in state.items()}),
        "dtype": str(target).removeprefix("torch."),
        "projector": "one Linear (LLaVA v1)" if one_linear else "mlp2x_gelu",
        "vision_feature_layer": config.vision_feature_layer,
        "image_size": config.vision_config.image_size,
        "sources": {"src": str(src), "vision_tower": str(vision_tower),
                    "projector": str(projector or src), "lm_head": str(lm_head or src)},
        "ignored_from_src": skipped,
    }  # fmt: skip
    (out / MARKER).write_text(json.dumps(summary, indent=2))
    log.info("converted base -> %s (%s)", out, summary["fingerprint"][:19])
    return summary


class ConvertBase(BaseModel):
    """convert LLaVA v1's base (Vicuna + CLIP + projector, or a saved M2PT run) for serving"""

    src: CliPositionalArg[str] = Field(
        description="LLaVA v1-layout directory: Vicuna, a LLaVA v1 release, or M2PT's saved model"
    )
    vision_tower: str = Field(description="the CLIP release directory (clip-vit-large-patch14)")
    projector: str | None = Field(
        None, description="mm_projector.bin of the pretrain release (when SRC has none)"
    )
    lm_head: str | None = Field(
        None, description="weights file holding the base's lm_head.weight (when SRC's is trained)"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    out: str = Field(description="the directory to write (serve it with --pretrained DIR)")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def settings(self) -> Settings:
        """Only the logging settings matter here (from the environment)."""
        return Settings()

    def run(self) -> int:
        done = convert_base(
            self.src, self.out, vision_tower=self.vision_tower, projector=self.projector,
            lm_head=self.lm_head, dtype=self.dtype,
        )  # fmt: skip
        print(f"wrote {self.out}: LLaVA base {done['fingerprint']}, {done['projector']} "
              f"projector, {done['dtype']}")  # fmt: skip
        return 0
