"""LLaVA's language model one step at a time, against a cache the caller owns (the continuous
batcher's KV slots): what `LlavaBackbone.forward`/`decode` do for a whole static batch, split so
that rows of different plans can join and leave a running batch.

Kept beside backbones/llava.py (not in it) so that the M²PT forward there stays the one reference
the engine is checked against; it uses only that module's public pieces and its one private
contract: text prompts travel as the `m2pt_text` kwarg to the decoder layers' pre-hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from service.backbones import grouped
from service.backbones.llava import LlavaBackbone, Prompts
from service.errors import BackboneError

# The 4D additive mask the continuous batcher passes is read by these attention kernels as is;
# flash-attention kernels take no such mask.
MASKED_ATTENTION = ("sdpa", "eager")


def check_attention(bb: LlavaBackbone) -> None:
    """Refuse a language model whose attention cannot take a per-row 4D mask."""
    impl = getattr(bb.lm.config, "_attn_implementation", None) or "eager"
    if impl not in MASKED_ATTENTION:
        raise BackboneError(
            f"continuous batching needs {' or '.join(MASKED_ATTENTION)} attention, not {impl!r}; "
            "use PROMPTSERVE_GENERATION=static"
        )


def request_embeds(
    bb: LlavaBackbone, ids: list[int], pixels: Tensor | None, prompts: Prompts
) -> Tensor:
    """`[1, n_text + len(ids), d]`: the prompt slots, then the tokens with the image features
    (under the plan's visual prompts and projector) in the image positions."""
    row_ids, _, _ = bb.layout([ids], prompts.n_text)
    if pixels is not None:
        pixels = pixels.to(bb.device, bb.dtype)
    return bb.embed(row_ids, pixels, prompts)


def token_embeds(bb: LlavaBackbone, tokens: Tensor) -> Tensor:
    """`[B, 1, d]` embeddings of one new token per row."""
    embeds: Tensor = bb.lm.embed_tokens(tokens.to(bb.device)[:, None])
    return embeds


def language_step(
    bb: LlavaBackbone,
    embeds: Tensor,
    positions: Tensor,
    mask: Tensor,
    cache: Any,
    text: Tensor | None = None,
    heads: Sequence[Tensor | None] = (),
) -> Tensor:
    """Logits `[B, V]` of the token after the last of `embeds` `[B, q, d]`; `text` `[B, Lt, nt,
    d]`: deep text prompts, written over positions `0..nt-1` (only in a forward that holds them,
    the first chunk of a prefill); `heads`: each row's own output head (None or (): the base's),
    as the static path's `DecodeState.heads`."""
    extra = {} if text is None else {"m2pt_text": text.to(bb.dtype)}
    out = bb.lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        **extra,
    )
    return grouped.head_logits(out.last_hidden_state[:, -1], heads, bb.model.lm_head.weight)
