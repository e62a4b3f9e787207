"""A tiny random LLaVA built in-test: CLIP vision tower, Llama language model, BPE tokenizer.

Nothing is downloaded: the tokenizer is trained here on a few sentences with `tokenizers`, the
image processor and the processor (with a chat template) are constructed locally.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.backbones.llava import DEFAULT_CHAT_TEMPLATE, LlavaBackbone

CORPUS = [
    "USER: what is in the image? ASSISTANT: a red square on a blue background.",
    "USER: describe the colour of the shape. ASSISTANT: the shape is green.",
    "what colour is it? it is yellow. how many shapes? two circles and one square.",
]


def tiny_processor() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=DEFAULT_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def tiny_model(processor: object, seed: int = 0, init_range: float = 0.02) -> object:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vocab = len(processor.tokenizer)  # type: ignore[attr-defined]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        initializer_range=init_range,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=3,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def make_backbone(seed: int = 0, init_range: float = 0.02) -> LlavaBackbone:
    processor = tiny_processor()
    model = tiny_model(processor, seed, init_range)
    return LlavaBackbone(model, processor, "tiny-llava", "none")


@pytest.fixture(scope="session")
def llava() -> LlavaBackbone:
    return make_backbone(0)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA saved with save_pretrained: what `--pretrained PATH` reads."""
    out = tmp_path_factory.mktemp("tiny-llava")
    processor = tiny_processor()
    tiny_model(processor, 0).save_pretrained(out)  # type: ignore[attr-defined]
    processor.save_pretrained(out)  # type: ignore[attr-defined]
    return out


def png(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(color: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png(color)).decode()


def m2pt_blob(llava: LlavaBackbone, name: str = "shapes", seed: int = 4, **cfg: object) -> bytes:
    """An M²PT checkpoint with large random prompts (visibly changes the answers)."""
    from service.checkpoints import BackboneRef, Manifest, dump
    from service.prompts.m2pt import M2PT

    method = M2PT()
    config = method.config(cfg)
    params = {k: v * 50 for k, v in method.init(llava, config, seed=seed).items()}
    manifest = Manifest(
        name=name,
        method="m2pt",
        method_config=config.model_dump(),
        backbone=BackboneRef(
            model=llava.model_name, pretrained=llava.pretrained, fingerprint=llava.fingerprint
        ),
        classnames=[],
    )
    return dump(params, manifest)
