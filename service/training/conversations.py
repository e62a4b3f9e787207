"""Instruction data in LLaVA's conversation JSON, as a run's data (`RunData`).

A JSON list of records `{"image": "rel/path.jpg", "conversations": [{"from": "human", "value":
"<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}` (the format of LLaVA's
instruction sets), images under `root`. Every assistant turn is one sample (`AnswerSample`): the
conversation before it (through the chat template) is the context, the answer (plus the
end-of-sequence token) what the method's objective learns. A run is scored by the mean loss on
the samples before and after training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.errors import InvalidContent, NotFound
from service.prompts import get_method
from service.prompts.m2pt import Turn
from service.training.runs import EvalSet, RunData, TrainSpec

MAX_RECORDS = 100_000
EVAL_BATCH = 4


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


def turns(records: list[dict[str, Any]], root: Path) -> list[Turn]:
    """One sample per assistant turn: the conversation before it, the answer, the image."""
    out: list[Turn] = []
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
            out.append(Turn(tuple(messages), text, image if n_images else None, n_images))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    if not out:
        raise InvalidContent("no assistant turns to learn from")
    return out


def load_data(spec: TrainSpec, backbone: Any, batch_size: int) -> RunData:
    """A `llava_json` dataset: shuffled batches of turns; scored by the mean loss on them."""
    if not spec.dataset.split_file:
        raise InvalidContent("dataset kind 'llava_json' needs split_file = the conversation JSON")
    root = Path(spec.dataset.root or Path(spec.dataset.split_file).parent)
    data = turns(load_conversations(spec.dataset.split_file, root), root)
    rng = random.Random(spec.seed)  # one stream over the epochs, drawn in epoch order

    def batches(epoch: int) -> Iterable[list[Turn]]:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [data[j] for j in order[i : i + batch_size]]

    def in_order() -> Iterable[list[Turn]]:
        return (data[i : i + EVAL_BATCH] for i in range(0, len(data), EVAL_BATCH))

    identity = {"kind": "llava_json", "file": str(spec.dataset.split_file), "samples": len(data)}
    return RunData([], batches, {"train": EvalSet([], in_order)}, identity, score=score_loss)


@torch.no_grad()
def score_loss(
    backbone: Any, spec: TrainSpec, params: dict[str, Tensor], evals: dict[str, EvalSet]
) -> dict[str, Any]:
    """Mean loss on the samples under the initial parameters and under the trained ones."""
    method = get_method(spec.method)
    cfg = method.config(spec.method_config)
    assert method.recipe is not None  # only trainable methods get scored
    objective = method.objective(
        backbone, cfg, [], spec.templates, method.recipe.with_overrides(spec.recipe), spec.seed
    )
    samples = evals["train"]

    def mean_loss(p: dict[str, Tensor]) -> float:
        dev = {k: v.to(backbone.device) for k, v in p.items()}
        losses = [float(objective.step(dev, batch).loss) for batch in samples.batches()]
        return sum(losses) / len(losses)

    initial = method.init(backbone, cfg, [], seed=spec.seed)
    return {
        "initial_loss": round(mean_loss(initial), 4),
        "final_loss": round(mean_loss(params), 4),
        "train_samples": sum(len(b) for b in samples.batches()),
    }
