"""open_clip ViT-B/32 weights -> a Hugging Face CLIPModel directory, for the peer server.

Run by bench/peers.py with the PEER's interpreter (its own venv, its own transformers), never
imported by the project: it needs only torch, safetensors and transformers.

    PEER_PYTHON bench/peers_hf.py OPEN_CLIP.safetensors VOCAB_DIR CHECK.safetensors OUT_DIR

The tokenizer is built from the vocabulary and merges that open_clip ships (written to VOCAB_DIR
by bench/peers.py): nothing comes from the hub. CHECK holds an input batch and the image
features open_clip computed for it; the converted model must reproduce them, so both servers
serve the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def config() -> CLIPConfig:
    """ViT-B/32 as open_clip builds it (exact GELU, not OpenAI's quick GELU)."""
    return CLIPConfig(
        text_config={
            "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
            "num_attention_heads": 8, "num_hidden_layers": 12, "max_position_embeddings": 77,
            "hidden_act": "gelu", "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "image_size": 224, "patch_size": 32, "hidden_act": "gelu",
        },
        projection_dim=512,
    )  # fmt: skip


def blocks(src: dict, prefix: str, dst: str, n: int) -> dict:
    out = {}
    for i in range(n):
        a, b = f"{prefix}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
        q, k, v = src[f"{a}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[f"{a}.attn.in_proj_bias"].chunk(3)
        out |= {
            f"{b}.self_attn.q_proj.weight": q, f"{b}.self_attn.k_proj.weight": k,
            f"{b}.self_attn.v_proj.weight": v, f"{b}.self_attn.q_proj.bias": qb,
            f"{b}.self_attn.k_proj.bias": kb, f"{b}.self_attn.v_proj.bias": vb,
        }  # fmt: skip
        for theirs, ours in (
            ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
        ):  # fmt: skip
            for p in ("weight", "bias"):
                out[f"{b}.{ours}.{p}"] = src[f"{a}.{theirs}.{p}"]
    return out


def convert(src: dict) -> dict:
    """open_clip state dict -> CLIPModel state dict."""
    v, t = "vision_model", "text_model"
    out = {
        f"{v}.embeddings.class_embedding": src["visual.class_embedding"],
        f"{v}.embeddings.patch_embedding.weight": src["visual.conv1.weight"],
        f"{v}.embeddings.position_embedding.weight": src["visual.positional_embedding"],
        "visual_projection.weight": src["visual.proj"].t().contiguous(),
        f"{t}.embeddings.token_embedding.weight": src["token_embedding.weight"],
        f"{t}.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_projection.weight": src["text_projection"].t().contiguous(),
        "logit_scale": src["logit_scale"],
    }
    for theirs, ours in (
        ("visual.ln_pre", f"{v}.pre_layrnorm"), ("visual.ln_post", f"{v}.post_layernorm"),
        ("ln_final", f"{t}.final_layer_norm"),
    ):  # fmt: skip
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = src[f"{theirs}.{p}"]
    out |= blocks(src, "visual.transformer", v, 12)
    out |= blocks(src, "transformer", t, 12)
    return out


def main(weights: str, vocab_dir: str, check: str, out_dir: str) -> None:
    model = CLIPModel(config()).eval()
    missing, unexpected = model.load_state_dict(convert(load_file(weights)), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers, not weights
    if missing or unexpected:
        raise SystemExit(f"conversion incomplete: missing {missing}, unexpected {unexpected}")
    ref = load_file(check)
    with torch.no_grad():
        got = model.get_image_features(pixel_values=ref["images"])
    diff = float((got - ref["features"]).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"converted model differs from open_clip's: max |diff| {diff:.2e}")
    vocab = Path(vocab_dir)
    tokenizer = CLIPTokenizer(
        str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True,
    )  # fmt: skip
    got_ids = tokenizer(["a photo of a cat."], return_tensors="pt")["input_ids"][0]
    if not torch.equal(got_ids, ref["ids"]):
        raise SystemExit(f"tokenizer differs from open_clip's: {got_ids} vs {ref['ids']}")
    model.save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    print(f"converted: image features match open_clip's (max |diff| {diff:.1e}), tokens too")


if __name__ == "__main__":
    main(*sys.argv[1:5])
