"""The reference implementations' forwards, restated for tests (LND layout, a layer counter,
`ln_post` on the class token), following muzairkhattak/multimodal-prompt-learning's clip/model.py
(`ResidualAttentionBlock_MaPLe` / `_IVLP`, `VisionTransformer_MaPLe`) and KaiyangZhou/CoOp's
`TextEncoder`/`PromptLearner`. Deliberately a different code path from service/backbones."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _block_lnd(block, x):
    # open_clip's blocks are batch-first; the reference runs LND.
    return block(x.permute(1, 0, 2)).permute(1, 0, 2)


def ref_image(visual, images, shared_ctx, deeper):
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    if shared_ctx is not None:
        x = torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    counter = 0
    for i, block in enumerate(visual.transformer.resblocks):
        if i != 0 and len(deeper) > 0 and not counter > len(deeper) - 1:
            n = deeper[counter].shape[0]
            prefix = x[0 : x.shape[0] - n]
            ctx = deeper[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([prefix, ctx], dim=0)
            counter += 1
        x = _block_lnd(block, x)
    x = x.permute(1, 0, 2)
    return visual.ln_post(x[:, 0, :]) @ visual.proj


def ref_prompts(model, tokenizer, classnames, prompt_prefix, n_ctx, ctx, position="end"):
    """CoOp's prompt construction from the token embeddings of "prefix name.": [SOS] + ctx +
    suffix ("end"); [SOS] + first half of ctx + name + second half + rest ("middle"); [SOS] +
    name + ctx + rest ("front"), the name being the class's BPE tokens at the suffix's start."""
    names = [c.replace("_", " ") for c in classnames]
    tokenized = tokenizer([f"{prompt_prefix} {n}." for n in names])
    emb = model.token_embedding(tokenized)
    prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx :]
    ctx = ctx.unsqueeze(0).expand(len(names), -1, -1) if ctx.dim() == 2 else ctx
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1), tokenized
    rows = []
    for i, name in enumerate(names):
        name_len = int(tokenizer([name]).argmax(dim=-1)[0]) - 1  # tokens between SOS and EOT
        head, c = prefix[i : i + 1], ctx[i : i + 1]
        cls, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
        if position == "middle":
            half = n_ctx // 2
            rows.append(torch.cat([head, c[:, :half], cls, c[:, half:], rest], dim=1))
        else:
            rows.append(torch.cat([head, cls, c, rest], dim=1))
    return torch.cat(rows), tokenized


def ref_text(model, prompts, tokenized, deeper):
    x = (prompts + model.positional_embedding).permute(1, 0, 2)
    counter = 0
    for i, block in enumerate(model.transformer.resblocks):
        if i != 0 and len(deeper) > 0 and not counter > len(deeper) - 1:
            n = deeper[counter].shape[0]
            prefix, suffix = x[:1], x[1 + n :]
            ctx = deeper[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([prefix, ctx, suffix], dim=0)
            counter += 1
        x = x.permute(1, 0, 2)
        x = block(x, attn_mask=model.attn_mask).permute(1, 0, 2)
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def ref_logits(model, image_features, text_features):
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    return model.logit_scale.exp() * img @ txt.t()
