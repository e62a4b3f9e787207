"""Train M²PT prompts on instruction data in LLaVA's conversation JSON, then publish.

Data: a JSON list of records `{"image": "rel/path.jpg", "conversations": [{"from": "human",
"value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}` (the format of
LLaVA's instruction sets), images under `root`. Every assistant turn is one training sample: the
conversation before it (through the chat template) is the context, and the loss is the token
cross-entropy on the answer (plus the end-of-sequence token) only. Only the prompts (and, with
`train_projector`, the projector copy) receive gradients; the backbone stays frozen.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import prompts_store as ps
from service.backbones.llava import LlavaBackbone
from service.checkpoints import BackboneRef, Manifest, dump
from service.engine.publish import Published, publish
from service.engine.store_errors import store_errors
from service.errors import InvalidContent, NotFound
from service.generative.m2pt import M2PT
from service.training.recipes import Recipe

# Our choice where the paper's code is not read here: AdamW without decay, a few epochs.
M2PT_RECIPE = Recipe(
    lr=7e-4, epochs=3, batch_size=4, optimizer="adamw", weight_decay=0.0, warmup_epochs=0
)
MAX_RECORDS = 100_000


@dataclass(frozen=True)
class Sample:
    prompt: list[int]
    answer: list[int]
    image: Path | None


def load_conversations(path: str | Path, root: str | Path | None) -> list[dict[str, Any]]:
    """The records of a LLaVA conversation JSON file (checked enough to fail with a 4xx)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"conversation file {path} does not exist")
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidContent(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not records or len(records) > MAX_RECORDS:
        raise InvalidContent(f"{path} must be a non-empty JSON list of conversations")
    base = Path(root) if root else path.parent
    for i, r in enumerate(records):
        turns = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(turns, list) or not turns:
            raise InvalidContent(f"record {i} has no 'conversations' list")
        if r.get("image") is not None and not (base / str(r["image"])).is_file():
            raise NotFound(f"record {i}: image {base / str(r['image'])} does not exist")
    return records


def samples(
    backbone: LlavaBackbone, records: list[dict[str, Any]], root: Path, n_visual: int = 0
) -> list[Sample]:
    """One sample per assistant turn: context ids, answer ids (+ EOS), the record's image.

    `n_visual`: the visual prompts per layer being trained; each image then takes
    `image_tokens(n_visual)` positions, as when the checkpoint is served.
    """
    out: list[Sample] = []
    eos = sorted(backbone.eos_ids)[:1]
    for r in records:
        image = root / str(r["image"]) if r.get("image") is not None else None
        messages: list[dict[str, Any]] = []
        for turn in r["conversations"]:
            text = str(turn.get("value", ""))
            if turn.get("from") in ("human", "user"):
                parts: list[dict[str, Any]] = []
                if "<image>" in text:
                    parts.append({"type": "image"})
                parts.append({"type": "text", "text": text.replace("<image>", "").strip()})
                messages.append({"role": "user", "content": parts})
                continue
            n_images = sum(
                1
                for m in messages
                for p in m["content"]
                if isinstance(p, dict) and p["type"] == "image"
            )
            if n_images and image is None:
                raise InvalidContent("a conversation mentions <image> but its record has none")
            prompt = backbone.encode_chat(messages, n_images, n_visual)
            answer = backbone.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            out.append(Sample(prompt, list(answer) + eos, image if n_images else None))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    if not out:
        raise InvalidContent("no assistant turns to learn from")
    return out


def batch_loss(
    backbone: LlavaBackbone, method: M2PT, params: dict[str, Tensor], batch: Sequence[Sample]
) -> Tensor:
    """Mean cross-entropy of the answer tokens under the prompts (differentiable in params)."""
    rows = [s.prompt + s.answer for s in batch]
    images = [Image.open(s.image).convert("RGB") for s in batch if s.image is not None]
    pixels = backbone.pixel_values(images) if images else None
    prompts = method.prompts(params, len(batch), backbone.dtype)
    # Rows with no image must not take a visual prompt row: embed() keeps rows with images only.
    logits, _ = backbone.forward(rows, pixels, prompts, all_logits=True)
    width = logits.shape[1]
    labels = torch.full((len(batch), width), -100, dtype=torch.long, device=logits.device)
    for b, s in enumerate(batch):
        labels[b, width - len(s.answer) :] = torch.tensor(s.answer, device=logits.device)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())


def train_m2pt(
    backbone: LlavaBackbone,
    data: list[Sample],
    method_config: dict[str, Any] | None = None,
    recipe: Recipe = M2PT_RECIPE,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, float]]]:
    """Train the prompts; returns them (CPU, float32) and the per-step loss history."""
    method = M2PT()
    cfg = method.config(method_config)
    params = {
        k: v.to(backbone.device).requires_grad_(True)
        for k, v in method.init(backbone, cfg, seed=seed).items()
    }
    opt = torch.optim.AdamW(params.values(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = random.Random(seed)
    history: list[dict[str, float]] = []
    for epoch in range(recipe.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), recipe.batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("training cancelled")
            loss = batch_loss(
                backbone, method, params, [data[j] for j in order[i : i + recipe.batch_size]]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            row = {"epoch": epoch, "step": len(history), "loss": float(loss.detach())}
            history.append(row)
            if progress is not None:
                progress(row)
    return {k: v.detach().float().cpu() for k, v in params.items()}, history


@torch.no_grad()
def mean_loss(backbone: LlavaBackbone, params: dict[str, Tensor], data: list[Sample]) -> float:
    method = M2PT()
    dev = {k: v.to(backbone.device) for k, v in params.items()}
    losses = [
        float(batch_loss(backbone, method, dev, data[i : i + 4])) for i in range(0, len(data), 4)
    ]
    return sum(losses) / len(losses)


def run_m2pt(
    spec: Any,
    backbone: LlavaBackbone,
    store: ps.PromptStore,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Published, dict[str, Any], dict[str, Tensor], list[dict[str, float]]]:
    """A `TrainSpec` run for M²PT: data, train, measure, publish (nothing if it failed)."""
    if not isinstance(backbone, LlavaBackbone):
        raise InvalidContent("m2pt trains on a LLaVA backbone: start with --backbone llava")
    if spec.dataset.kind != "llava_json" or not spec.dataset.split_file:
        raise InvalidContent("m2pt needs dataset kind 'llava_json' with split_file = the JSON")
    root = Path(spec.dataset.root or Path(spec.dataset.split_file).parent)
    n_visual = M2PT().config(spec.method_config).n_visual
    data = samples(backbone, load_conversations(spec.dataset.split_file, root), root, n_visual)
    recipe = M2PT_RECIPE.with_overrides(spec.recipe)
    start = time.perf_counter()
    before = mean_loss(
        backbone, M2PT().init(backbone, M2PT().config(spec.method_config), seed=spec.seed), data
    )
    params, history = train_m2pt(
        backbone, data, spec.method_config, recipe, spec.seed, progress, should_stop
    )
    metrics = {
        "initial_loss": round(before, 4),
        "final_loss": round(mean_loss(backbone, params, data), 4),
        "train_samples": len(data),
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    with store_errors():
        try:
            parent = store.current(spec.name)
        except ps.NotFound:
            parent = None
    manifest = Manifest(
        name=spec.name,
        method="m2pt",
        method_config=M2PT().config(spec.method_config).model_dump(),
        backbone=BackboneRef(
            model=backbone.model_name,
            pretrained=backbone.pretrained,
            fingerprint=backbone.fingerprint,
        ),
        classnames=[],
        metrics=metrics,
        dataset={"kind": "llava_json", "file": str(spec.dataset.split_file), "samples": len(data)},
        parent=parent,
    )
    published = publish(store, backbone, dump(params, manifest), activate=spec.activate)  # type: ignore[arg-type]
    return published, metrics, params, history
