"""Tiny stand-ins for what M²PT's official recipe trains on and saves, built in-test.

Read from the reference (William-wAng618/M2PT: `scripts/PT_full_schedule.sh`, `train/train_PT.py`,
`model/llava_archPT.py`), not copied:

* the base is three releases: Vicuna (a LLaMA directory: config, weights in LLaVA v1's key
  names, a SentencePiece-style tokenizer with a BOS on every call and a word-start marker on
  every chunk), CLIP's vision tower (its own directory), and LLaVA v1's pretrain
  `mm_projector.bin` (`model.mm_projector.{weight,bias}`: ONE Linear);
* a run saves the whole model's state dict in bf16 with `save_pretrained` (shards + index): the
  frozen language model and tower (the tower cast fp32 -> fp16 -> bf16, as the script casts it),
  the trained projector and the trained `lm_head` (re-created as a parameter, recipe
  `tune_lm_header`), the prompts `model.prompts.N` `[1, nt, d]` and
  `model.vision_tower.vision_tower.vision_model.encoder.prompts.N` `[1, nv, d]`, and a config.json
  naming its base, and the tokenizer the trainer was given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CORPUS = [
    "USER: what is in the image? ASSISTANT: a red square on a blue background.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "describe the colour of the shape. the shape is green. how many shapes? two circles.",
]
VIS = "model.vision_tower.vision_tower.vision_model.encoder.prompts.{}"
TXT = "model.prompts.{}"
NV, NT = 3, 4  # prompt lengths of the tiny run


def tokenizer() -> object:
    """A Llama-like fast tokenizer: BOS on every call, '▁' in front of every chunk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@dataclass
class Releases:
    """The three releases the base is converted from."""

    vicuna: Path
    clip: Path
    projector: Path


def releases(root: Path, seed: int = 0) -> Releases:
    """Vicuna, CLIP and the pretrain projector, tiny, saved as their releases are."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = tokenizer()
    torch.manual_seed(seed)
    vicuna = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,  # type: ignore[arg-type]
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    )
    out = Releases(root / "vicuna", root / "clip", root / "llava-pretrain" / "mm_projector.bin")
    vicuna.half().save_pretrained(out.vicuna)  # Vicuna ships fp16
    tok.save_pretrained(out.vicuna)  # type: ignore[attr-defined]
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
            initializer_range=0.2,
        )
    )
    clip.save_pretrained(out.clip)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(out.clip)
    out.projector.parent.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.save(
        {
            "model.mm_projector.weight": torch.randn(48, 32, generator=gen) * 0.3,
            "model.mm_projector.bias": torch.randn(48, generator=gen) * 0.1,
        },
        out.projector,
    )
    return out


def run_state(rel: Releases, seed: int = 7, scale: float = 1.0) -> dict[str, Tensor]:
    """The whole-model state dict a run saves (bf16): frozen parts as cast, trained parts moved."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, value in load_file(str(rel.vicuna / "model.safetensors")).items():
        state[key] = value.to(torch.bfloat16)
    for key, value in load_file(str(rel.clip / "model.safetensors")).items():
        state[f"model.vision_tower.vision_tower.{key}"] = value.half().to(torch.bfloat16)
    for key, value in torch.load(rel.projector, weights_only=True).items():
        state[key] = (value + scale * 0.3 * torch.randn(value.shape, generator=gen)).bfloat16()
    head = state["lm_head.weight"].float()
    state["lm_head.weight"] = (head + scale * 0.5 * torch.randn(head.shape, generator=gen)).to(
        torch.bfloat16
    )
    for i in range(3):  # every CLIP layer and every decoder layer has its prompt
        state[VIS.format(i)] = (torch.randn(1, NV, 32, generator=gen) * 2).bfloat16()
        state[TXT.format(i)] = (torch.randn(1, NT, 48, generator=gen) * 2).bfloat16()
    return state


def save_run(state: dict[str, Tensor], rel: Releases, out: Path) -> Path:
    """As `trainer.save_model` (transformers 4.31) writes it: two shards, an index, config.json,
    and the tokenizer (the trainer is given it; the v1 recipe pads with unk)."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(rel.vicuna))
    tok.pad_token = tok.unk_token
    tok.save_pretrained(str(out))
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2]}
    shards["pytorch_model-00002-of-00002.bin"] = keys[1::2]
    weight_map = {}
    for fname, ks in shards.items():
        torch.save({k: state[k] for k in ks}, out / fname)
        weight_map.update(dict.fromkeys(ks, fname))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((rel.vicuna / "config.json").read_text())
    config.update(
        _name_or_path="./models/vicuna-7b-v1.3", model_type="llava",
        architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=32, mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_vision_tower="./models/clip-vit-large-patch14",
        mm_use_im_start_end=False, tune_mm_mlp_adapter=True, torch_dtype="bfloat16",
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out
