"""The frozen LLaVA backbone (transformers) and its M²PT-prompted forward.

The prompted forward (M²PT, arXiv 2409.15657) is written here rather than patched into
transformers' modules, so one frozen model serves prompted and plain requests side by side:

* vision: deep prompts are prepended before the class token after the pre-layernorm and
  overwritten at the input of every prompted layer, as in the paper's code (William-wAng618/M2PT,
  `modeling_clipPT.py`). That code then applies LLaVA's feature selection to the *prompted*
  sequence: the selected hidden state (`vision_feature_layer`, -2) is the input of the layer
  after the last one run, so its first `nv` rows hold that layer's prompt (written in place
  before the state is recorded), and 'default' ('patch') drops only row 0. The language model
  therefore sees `nv - 1` raw prompt vectors, the class token and the patches: patches + nv
  image positions per image (586 for ViT-L/14-336 and 10 prompts), and every `<image>` expands
  to `image_tokens(nv)` placeholders. We reproduce that layout exactly.
* language: deep prompts occupy the first `n` positions of the sequence; a pre-hook on every
  decoder layer overwrites them during prefill (the kwarg `m2pt_text` travels through the model's
  `**kwargs`, so there is no shared mutable state between threads). Decode steps pass nothing:
  the prompts' keys and values are carried by the KV cache.
* positions: prompts take 0..n-1, then each row's tokens (left padding masked out); position ids
  are the cumulative sum of the attention mask, as `generate` computes.
* projector and output head: each row may carry its checkpoint's own (the reference trains
  both); rows are grouped by the tensors they use (grouped.py). Loading: llava_loading.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.backbones import grouped
from service.backbones.base import Capability
from service.backbones.clip import PRECISIONS, fingerprint_state
from service.backbones.conversation import (
    DEFAULT_CHAT_TEMPLATE,
    IMAGE,
    Conversation,
    chunked_ids,
)
from service.errors import BackboneError, BadRequest


@dataclass(frozen=True)
class Prompts:
    """Per-row M²PT tensors of one batch: prompts of one shape, and each row's own projector
    and output head (None: the base's), so rows of different checkpoints share a batch."""

    vision: Tensor | None = None  # [B, Lv, nv, d_vision]
    text: Tensor | None = None  # [B, Lt, nt, d_text]
    projectors: tuple[Mapping[str, Tensor] | None, ...] = ()  # per row; (): the base's for all
    heads: tuple[Tensor | None, ...] = ()  # per row `[V, d_text]`; (): the base's for all

    @property
    def n_text(self) -> int:
        return 0 if self.text is None else int(self.text.shape[2])

    @property
    def n_visual(self) -> int:
        return 0 if self.vision is None else int(self.vision.shape[2])


NO_PROMPTS = Prompts()


@dataclass
class DecodeState:
    """What a decode step needs after prefill: the cache, the mask so far, the last positions."""

    cache: Any
    attention_mask: Tensor  # [B, S]
    last_position: Tensor  # [B]
    heads: tuple[Tensor | None, ...] = ()  # each row's output head, as in `Prompts`


def _text_prompt_hook(index: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tokens = kwargs.pop("m2pt_text", None)  # always popped: attention must never see it
        if tokens is None or index >= tokens.shape[1]:
            return args, kwargs
        hidden = args[0] if args else kwargs.pop("hidden_states")
        n = tokens.shape[2]
        hidden = torch.cat([tokens[:, index].to(hidden.dtype), hidden[:, n:]], dim=1)
        return (hidden, *args[1:]), kwargs

    return hook


def _one_linear(projector: nn.Module) -> bool:
    """LLaVA v1's projector is one Linear; the served form (transformers' two-layer projector,
    see importers/llava_base.py) holds it as `linear_1` with a linear activation and an identity
    `linear_2`, which this detects so that only `linear_1` is trained, carried and computed."""
    act, second = getattr(projector, "act", None), getattr(projector, "linear_2", None)
    if type(act).__name__ not in ("LinearActivation", "Identity") or not isinstance(
        second, nn.Linear
    ):
        return False
    w = second.weight.detach()
    if w.shape[0] != w.shape[1] or not torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)):
        return False
    return second.bias is None or not bool(second.bias.detach().any())


class LlavaBackbone:
    """One frozen LlavaForConditionalGeneration with its processor and fingerprint."""

    kind: ClassVar[str] = "llava"
    title: ClassVar[str] = "LLaVA"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"answer"})

    def __init__(
        self,
        model: Any,
        processor: Any,
        model_name: str,
        pretrained: str,
        *,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise BackboneError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        self.fingerprint = fingerprint_state(model.state_dict())  # before any precision cast
        self.device, self.dtype = torch.device(device), PRECISIONS[precision]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.processor, self.tokenizer = processor, processor.tokenizer
        if getattr(processor, "chat_template", None) is None:
            processor.chat_template = DEFAULT_CHAT_TEMPLATE
        self.model_name, self.pretrained = model_name, pretrained
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise BackboneError("only LLaVA models with one vision feature layer are supported")
        tower = model.model.vision_tower
        self.tower: Any = getattr(tower, "vision_model", tower)
        if not all(hasattr(self.tower, a) for a in ("embeddings", "pre_layrnorm", "encoder")):
            raise BackboneError(
                "M²PT needs a CLIP vision tower (embeddings, pre_layrnorm, encoder)"
            )
        self.lm: Any = model.model.language_model
        self.projector: nn.Module = model.model.multi_modal_projector
        self.one_linear = _one_linear(self.projector)
        self.n_vision_layers = len(self.tower.encoder.layers)
        # index into the tower's hidden states (embeddings, then each layer's output) = layers run
        self.feature_layers = cfg.vision_feature_layer % (self.n_vision_layers + 1)
        self.strategy = cfg.vision_feature_select_strategy
        self.image_token_id = int(cfg.image_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        eos = model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        for i, layer in enumerate(self.lm.layers):
            layer.register_forward_pre_hook(_text_prompt_hook(i), with_kwargs=True)

    def describe(self) -> dict[str, str]:
        """What /readyz and the start-up log say about the backbone."""
        return {
            "backbone": self.model_name,
            "kind": self.kind,
            "pretrained": self.pretrained,
            "device": str(self.device),
            "fingerprint": self.fingerprint,
        }

    # --- dimensions the M²PT parameters are declared against -----------------------------------
    @property
    def vision_width(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    @property
    def vision_layers(self) -> int:
        """Visual prompt depth that reaches the projector: one set per layer run, plus the set
        written into the selected state itself (its rows 1..nv-1 are projected as they are),
        unless that state is the last layer's output. Deeper prompts would be unused."""
        return min(int(self.feature_layers) + 1, self.n_vision_layers)

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def text_layers(self) -> int:
        return len(self.lm.layers)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 4096))

    def projector_shapes(self) -> dict[str, tuple[int, ...]]:
        """The projector's trainable tensors: LLaVA v1's one Linear is `linear_1` (the served
        form's `linear_2` is a fixed identity, see `_one_linear`), LLaVA-1.5's both layers."""
        return {
            k: tuple(v.shape)
            for k, v in self.projector.state_dict().items()
            if not (self.one_linear and k.startswith("linear_2."))
        }

    @property
    def head_shape(self) -> tuple[int, int]:
        """The output head's `[vocab, d_text]`."""
        return (int(self.model.lm_head.weight.shape[0]), int(self.model.lm_head.weight.shape[1]))

    # --- inputs ---------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> Tensor:
        """PIL images -> `[N, 3, H, W]` in the model's preprocessing."""
        out = self.processor.image_processor(list(images), return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        n_images: int,
        n_visual: int = 0,
        conversation: Conversation | None = None,
    ) -> list[int]:
        """Token ids of a conversation ending with the assistant's turn; image tokens expanded
        to `image_tokens(n_visual)` each (`n_visual`: the plan's visual prompts per layer).
        `conversation`: the checkpoint's own template (else the processor's chat template)."""
        if conversation is None:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return self.encode_text(text, n_images, n_visual)
        text = conversation.render(messages)
        if not conversation.chunked:
            return self.encode_text(text, n_images, n_visual)
        if text.count(IMAGE) != n_images:
            raise BadRequest(f"{text.count(IMAGE)} image markers for {n_images} images")
        return chunked_ids(
            self.tokenizer, text, [self.image_token_id] * self.image_tokens(n_visual)
        )

    def encode_text(self, text: str, n_images: int, n_visual: int = 0) -> list[int]:
        """Token ids of text holding `n_images` `<image>` markers, each expanded to its features."""
        image_token = getattr(self.processor, "image_token", "<image>")
        if text.count(image_token) != n_images:
            raise BadRequest(f"{text.count(image_token)} image markers for {n_images} images")
        expanded = text.replace(image_token, image_token * self.image_tokens(n_visual))
        ids: list[int] = self.tokenizer(expanded, add_special_tokens=True)["input_ids"]
        return ids

    def image_tokens(self, n_visual: int = 0) -> int:
        """Image positions per image the language model sees: the selected vision state
        (`n_visual` prompts, class token, patches) less row 0 under the 'default' strategy."""
        vc = self.model.config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        return int(n_visual + 1 + patches - (1 if self.strategy == "default" else 0))

    # --- the prompted forward ------------------------------------------------------------------
    def image_features(
        self,
        pixel_values: Tensor,
        vision: Tensor | None = None,
        projectors: Sequence[Mapping[str, Tensor] | None] = (),
    ) -> Tensor:
        """`[N, image_tokens(nv), text_width]`: deep-prompted vision tower, then the projector.

        State i (the input of layer i, i <= the selected one) gets its prompt rows written
        before it is used or selected; the selected state is the last layer's output only when
        `vision_feature_layer` is -1, and that one is never overwritten.
        """
        hidden = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values.to(self.dtype)))
        depth, n = (0, 0) if vision is None else (int(vision.shape[1]), int(vision.shape[2]))
        for i in range(self.feature_layers + 1):
            if i < depth:
                rest = hidden if i == 0 else hidden[:, n:]
                hidden = torch.cat([vision[:, i].to(hidden.dtype), rest], dim=1)  # type: ignore[index]
            if i < self.feature_layers:
                hidden = self.tower.encoder.layers[i](hidden, None)
        feats = hidden[:, 1:] if self.strategy == "default" else hidden
        return grouped.apply(feats, projectors, self.project)

    def project(self, feats: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """The projector, with a checkpoint's own tensors in place of the base's ones it names."""
        if self.one_linear:  # the identity tail is exact; skip its d x d product
            lin = self.projector.get_submodule("linear_1")
            w: dict[str, Tensor] = {**dict(lin.named_parameters("linear_1")), **(weights or {})}
            return F.linear(feats, w["linear_1.weight"], w.get("linear_1.bias"))
        if weights is None:
            return self.projector(feats)
        return torch.func.functional_call(self.projector, dict(weights), (feats,))

    def layout(self, rows: Sequence[Sequence[int]], n_text: int) -> tuple[Tensor, Tensor, Tensor]:
        """`[prompt slots | left padding | tokens]` ids, attention mask and position ids."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), n_text + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        mask[:, :n_text] = 1
        for b, row in enumerate(rows):
            if row:
                ids[b, n_text + width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
                mask[b, n_text + width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def embed(
        self, ids: Tensor, pixel_values: Tensor | None, prompts: Prompts = NO_PROMPTS
    ) -> Tensor:
        """Token embeddings with image features scattered into the image-token positions."""
        slots = ids == self.image_token_id
        slots[:, : prompts.n_text] = False  # prompt slots hold pad ids, but be explicit
        # image slots are never looked up (LLaVA v1 bases put the placeholder past the vocabulary)
        embeds = self.lm.embed_tokens(ids.masked_fill(slots, self.pad_id))
        if pixel_values is None:
            if slots.any():
                raise BadRequest("image tokens in the text but no image was given")
            return embeds
        vision, projectors = prompts.vision, prompts.projectors
        with_image = slots.any(-1)
        if vision is not None:  # only rows holding an image get their vision prompts
            vision = vision[with_image]
        if projectors:
            projectors = tuple(
                p for p, keep in zip(projectors, with_image.tolist(), strict=True) if keep
            )
        feats = self.image_features(pixel_values, vision, projectors)
        if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
            raise BadRequest(
                f"{int(slots.sum())} image tokens in the text for {feats.shape[0]} image(s) of "
                f"{feats.shape[1]} features each (encode with the plan's n_visual)"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(
        self,
        rows: Sequence[Sequence[int]],
        pixel_values: Tensor | None,
        prompts: Prompts = NO_PROMPTS,
        *,
        use_cache: bool = False,
        all_logits: bool = False,
    ) -> tuple[Tensor, DecodeState | None]:
        """Prefill: logits of the next token `[B, V]` (or of every position `[B, S, V]`)."""
        ids, mask, positions = self.layout(rows, prompts.n_text)
        if positions.max() >= self.max_positions:
            raise BadRequest(f"prompt of {ids.shape[1]} tokens exceeds {self.max_positions}")
        extra = {} if prompts.text is None else {"m2pt_text": prompts.text}
        out = self.lm(
            inputs_embeds=self.embed(ids, pixel_values, prompts),
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **extra,
        )
        hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1]
        logits = grouped.head_logits(hidden, prompts.heads, self.model.lm_head.weight)
        state = DecodeState(out.cache, mask, positions[:, -1], prompts.heads) if use_cache else None
        return logits, state

    def decode(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """One decode step from the cache: logits `[B, V]` of the token after `tokens` `[B]`."""
        tokens = tokens.to(self.device)
        state.attention_mask = torch.cat(
            [state.attention_mask, torch.ones_like(state.attention_mask[:, :1])], dim=1
        )
        state.last_position = state.last_position + 1
        out = self.lm(
            inputs_embeds=self.lm.embed_tokens(tokens[:, None]),
            attention_mask=state.attention_mask,
            position_ids=state.last_position[:, None],
            cache=state.cache,  # the Cache API (`past_key_values` is removed in transformers 5.40)
            use_cache=True,
        )
        state.cache = out.cache
        return grouped.head_logits(
            out.last_hidden_state[:, -1], state.heads, self.model.lm_head.weight
        )

    @torch.no_grad()
    def greedy(
        self,
        rows: Sequence[Sequence[int]],
        pixel_values: Tensor | None,
        prompts: Prompts = NO_PROMPTS,
        max_new_tokens: int = 16,
        *,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Greedy tokens per row (no early stop): the reference the engine and tests check."""
        out: list[list[int]] = [[] for _ in rows]
        logits, state = self.forward(rows, pixel_values, prompts, use_cache=use_cache)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                out[b].append(int(t))
            if step == max_new_tokens - 1:
                break
            if state is not None:
                logits = self.decode(state, nxt)
            else:  # the whole sequence again, prompts rewritten at every layer
                full = [list(r) + o for r, o in zip(rows, out, strict=True)]
                logits, _ = self.forward(full, pixel_values, prompts)
        return out
