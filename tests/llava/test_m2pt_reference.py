"""M²PT as its reference trains it, end to end on tiny models built in-test (reference_v1.py):
the base converted from its releases, a run's whole saved model imported (prompts, the
one-Linear projector, the output head, the llava_v1 template) and served; the answer checked
against an independent computation with plain transformers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import Tensor

from prompts_store import open_store
from service.app import create_app
from service.backbones.llava import LlavaBackbone
from service.backbones.llava_loading import load_llava
from service.checkpoints import materialize
from service.checkpoints.publish import publish
from service.cli import main
from service.engine.answering import user_message
from service.engine.generation import GenerationEngine, Sampling
from service.importers.m2pt import import_m2pt
from service.prompts.m2pt import AnswerPlan
from service.settings import Settings
from tests.llava.conftest import data_uri
from tests.llava.reference_v1 import NT, NV, TXT, VIS, Releases, releases, run_state, save_run

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
QUESTION = "what is in the image?"
COLOUR = (200, 30, 30)
STEPS = 10
AUTH = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return releases(tmp_path_factory.mktemp("releases"))


@pytest.fixture(scope="module")
def base(rel: Releases, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served base, converted by the one command (float32: the tower's fp16 cast in the
    run is then a real difference in dtype path, which the comparison must see through)."""
    out = tmp_path_factory.mktemp("base") / "llava-v1"
    argv = ["convert-base", str(rel.vicuna), "--vision-tower", str(rel.clip)]
    assert (
        main([*argv, "--projector", str(rel.projector), "--dtype", "float32", "--out", str(out)])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def bb(base: Path) -> LlavaBackbone:
    return load_llava(str(base), str(base))


@pytest.fixture(scope="module")
def run(rel: Releases, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Tensor], Path]:
    state = run_state(rel, seed=7)
    return state, save_run(state, rel, tmp_path_factory.mktemp("runs") / "PT_LLM4-Vis3")


# --- the independent computation ---------------------------------------------------------------


def reference_ids(tok: Any, prompt: str, image_positions: int) -> tuple[list[int], int]:
    """`tokenizer_image_token` as the reference describes it (chunks apart, one BOS), with the
    image's positions as -1 placeholders; returns the ids and where the image starts."""
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    assert all(c[0] == tok.bos_token_id for c in chunks)
    ids = [tok.bos_token_id, *chunks[0][1:]]
    start = len(ids)
    ids += [-1] * image_positions + chunks[1][1:]
    return ids, start


@torch.no_grad()
def independent_answer(
    base: Path, state: dict[str, Tensor], question: str = QUESTION, steps: int = STEPS
) -> list[int]:
    """Plain transformers: the base loaded with from_pretrained, the run's projector and head
    put in place, the prompts applied by hand (visual: prepended, written into every layer's
    input; textual: prepended, written into every decoder layer's input), greedy decoding
    without a cache. Checks that every step's top-2 margin is wide enough to be well-posed."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(base))
    f = {k: v.float() for k, v in state.items()}
    model.model.multi_modal_projector.linear_1.weight.copy_(f["model.mm_projector.weight"])
    model.model.multi_modal_projector.linear_1.bias.copy_(f["model.mm_projector.bias"])
    model.lm_head.weight.copy_(f["lm_head.weight"])
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    pixels = proc.image_processor([Image.new("RGB", (40, 40), COLOUR)], return_tensors="pt")
    hidden = tower.pre_layrnorm(tower.embeddings(pixels["pixel_values"]))
    hidden = torch.cat([f[VIS.format(0)], hidden], dim=1)
    states = []
    for i, layer in enumerate(tower.encoder.layers):
        hidden = hidden.clone()
        hidden[:, :NV] = f[VIS.format(i)]
        states.append(hidden)
        hidden = layer(hidden, None)
    states.append(hidden)
    feats = model.model.multi_modal_projector(states[-2][:, 1:])[0]  # layer -2, 'patch'
    prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    ids, start = reference_ids(proc.tokenizer, prompt, feats.shape[0])
    lm = model.model.language_model
    hooks = [
        layer.register_forward_pre_hook(_writer(f[TXT.format(i)]))
        for i, layer in enumerate(lm.layers)
    ]
    out: list[int] = []
    try:
        for _ in range(steps):
            text = torch.tensor([[max(t, 0) for t in ids]])
            embeds = lm.embed_tokens(text)[0]
            embeds[start : start + feats.shape[0]] = feats
            x = torch.cat([f[TXT.format(0)][0], embeds])[None]
            hidden_out = lm(inputs_embeds=x, position_ids=torch.arange(x.shape[1])[None])
            logits = model.lm_head(hidden_out.last_hidden_state[0, -1])
            top = logits.topk(2).values
            assert float(top[0] - top[1]) > 1e-3, "a near tie: pick another seed"
            out.append(int(logits.argmax()))
            if out[-1] == proc.tokenizer.eos_token_id:
                break
            ids.append(out[-1])
    finally:
        for h in hooks:
            h.remove()
    return out


def _writer(prompt: Tensor) -> Any:
    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0].clone()
        hidden[:, : prompt.shape[1]] = prompt
        return (hidden, *args[1:])

    return hook


# --- tests ---------------------------------------------------------------------------------------


def test_the_base_is_llava_v1s_and_its_marker_names_its_fingerprint(
    base: Path, bb: LlavaBackbone
) -> None:
    marker = json.loads((base / "promptserve-base.json").read_text())
    assert marker["fingerprint"] == bb.fingerprint
    assert bb.one_linear and set(bb.projector_shapes()) == {"linear_1.weight", "linear_1.bias"}
    assert bb.model.config.vision_feature_layer == -2 and bb.strategy == "default"
    assert bb.image_token_id >= bb.head_shape[0]  # a placeholder past the vocabulary
    # the identity second layer is exact: the served projection is the one Linear
    x = torch.randn(5, bb.vision_width)
    lin = bb.projector.linear_1
    assert torch.equal(bb.projector(x), lin(x)) and torch.equal(bb.project(x), lin(x))


def test_every_tensor_the_reference_trains_is_imported(
    bb: LlavaBackbone, run: tuple[dict[str, Tensor], Path]
) -> None:
    state, path = run
    ckpt, _ = import_m2pt(path, name="flan", backbone=bb)
    p, cfg, m = ckpt.params, ckpt.manifest.method_config, ckpt.manifest
    assert set(p) == {
        "visual_prompts", "text_prompts", "projector.linear_1.weight", "projector.linear_1.bias",
        "head.weight",
    }  # fmt: skip
    assert all(t.dtype == torch.bfloat16 for t in p.values())  # as trained, bit for bit
    assert torch.equal(p["head.weight"], state["lm_head.weight"])
    assert torch.equal(p["projector.linear_1.weight"], state["model.mm_projector.weight"])
    assert torch.equal(p["projector.linear_1.bias"], state["model.mm_projector.bias"])
    assert torch.equal(p["visual_prompts"], torch.cat([state[VIS.format(i)] for i in range(3)]))
    assert torch.equal(p["text_prompts"], torch.cat([state[TXT.format(i)] for i in range(3)]))
    assert (cfg["train_projector"], cfg["train_head"], cfg["n_visual"], cfg["n_text"]) == (
        True, True, NV, NT,
    )  # fmt: skip
    assert cfg["conversation"]["name"] == "llava_v1" and cfg["conversation"]["system"] == SYSTEM
    frozen = [k for k in state if "prompts" not in k and "mm_projector" not in k]
    assert m.metrics["equal_to_base"] == len(frozen) - 1  # every frozen tensor but lm_head
    assert m.metrics["trained_on"]["_name_or_path"] == "./models/vicuna-7b-v1.3"
    assert m.dropped == []


@pytest.fixture(scope="module")
def client(
    bb: LlavaBackbone, run: tuple[dict[str, Tensor], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    store = f"file://{tmp_path_factory.mktemp('store')}"
    s = open_store(store)
    publish(s, bb, import_m2pt(run[1], name="flan", backbone=bb)[1])
    s.close()
    settings = Settings(store=store, backbone="llava", api_keys="admin-key", admin_keys="admin-key")
    with TestClient(create_app(settings, backbone=bb)) as c:
        yield c


def test_served_greedy_answer_is_the_independent_computation(
    bb: LlavaBackbone, base: Path, run: tuple[dict[str, Tensor], Path], client: TestClient
) -> None:
    eos = bb.tokenizer.eos_token_id
    want = [t for t in independent_answer(base, run[0]) if t != eos]
    body = {"checkpoint": "flan", "image": data_uri(COLOUR), "instruction": QUESTION}
    got = client.post("/v1/answer", json={**body, "max_new_tokens": STEPS}, headers=AUTH)
    assert got.status_code == 200, got.text
    answer = got.json()
    assert answer["answer"] == bb.tokenizer.decode(want, skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == len(want) > 0
    # token for token through the engine; and each trained part changes the answer
    plan = _plan(bb, run[1])
    assert _tokens(bb, [plan])[0] == want
    for drop in ("lm_head.weight", "model.mm_projector.*"):
        without = _plan(bb, run[1], drop=[drop])
        assert _tokens(bb, [without])[0] != _tokens(bb, [plan])[0], drop


def _plan(bb: LlavaBackbone, path: Path, **kw: Any) -> AnswerPlan:
    ckpt, _ = import_m2pt(path, name="x", backbone=bb, **kw)
    plan = materialize(ckpt, bb)
    assert isinstance(plan, AnswerPlan)
    return plan


def _tokens(
    bb: LlavaBackbone, plans: list[AnswerPlan], questions: list[str] | None = None
) -> list[list[int]]:
    """Greedy tokens of concurrent requests through the generation engine (one batch)."""
    questions = questions or [QUESTION] * len(plans)
    pixels = bb.pixel_values([Image.new("RGB", (40, 40), COLOUR)]).cpu()

    async def go() -> list[list[int]]:
        engine = GenerationEngine(bb, max_batch_size=len(plans), max_wait_ms=200)
        await engine.start()
        try:
            outs = await asyncio.gather(*(
                engine.complete(
                    bb.encode_chat(user_message(q, True), 1, p.n_visual, p.conversation),
                    pixels, p, Sampling(max_new_tokens=STEPS),
                )
                for p, q in zip(plans, questions, strict=True)
            ))  # fmt: skip
            assert engine.batches == [len(plans)]  # all of them in one batch
            return [t for t, _ in outs]
        finally:
            await engine.stop()

    return asyncio.run(go())


def test_rows_with_different_heads_and_projectors_share_a_batch_and_answer_as_alone(
    bb: LlavaBackbone, rel: Releases, run: tuple[dict[str, Tensor], Path], tmp_path: Path
) -> None:
    other = save_run(run_state(rel, seed=8), rel, tmp_path / "other")
    a, b = _plan(bb, run[1]), _plan(bb, other)
    c = _plan(bb, other, drop=["lm_head.weight"])  # B's prompts and projector, the base's head
    assert c.head is None and b.head is not None and not torch.equal(a.head, b.head)  # type: ignore[arg-type]
    plans = [a, b, c, a]
    questions = [QUESTION, QUESTION, QUESTION, "describe the colour of the shape."]
    mixed = _tokens(bb, plans, questions)
    alone = [_tokens(bb, [p], [q])[0] for p, q in zip(plans, questions, strict=True)]
    assert mixed == alone
    assert len({tuple(t) for t in mixed[:3]}) == 3  # three checkpoints, three answers


def test_a_trained_tensor_is_never_dropped_silently(
    bb: LlavaBackbone, rel: Releases, run: tuple[dict[str, Tensor], Path], client: TestClient,
    tmp_path: Path,
) -> None:  # fmt: skip
    from service.errors import BackboneMismatch, InvalidContent

    state = dict(run[0])
    key = "model.layers.1.mlp.down_proj.weight"
    state[key] = (state[key].float() * 1.01).bfloat16()  # fine-tuned beyond M²PT
    state["model.extra_adapter.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    path = save_run(state, rel, tmp_path / "tuned")
    with pytest.raises(InvalidContent, match="would lose") as err:
        import_m2pt(path, name="tuned", backbone=bb)
    assert key in str(err.value) and "model.extra_adapter.weight" in str(err.value)
    assert "differs from the base" in str(err.value)
    ckpt, data = import_m2pt(
        path, name="tuned", backbone=bb, drop=["model.layers.1.*", "model.extra_*"]
    )
    assert {d["tensor"] for d in ckpt.manifest.dropped} == {key, "model.extra_adapter.weight"}
    assert all(d["dropped_by"] and d["why"] for d in ckpt.manifest.dropped)
    up = client.post("/v1/checkpoints", files={"file": ("t.safetensors", data)}, headers=AUTH)
    assert up.status_code == 201, up.text
    shown = client.get("/v1/checkpoints/tuned", headers=AUTH).json()
    assert {d["tensor"] for d in shown["dropped"]} == {key, "model.extra_adapter.weight"}
    assert shown["conversation"]["name"] == "llava_v1"
    assert client.get("/v1/checkpoints/flan", headers=AUTH).json()["dropped"] == []
    # dropping the head on purpose: recorded, and the plan serves the base's head
    headless, _ = import_m2pt(run[1], name="h", backbone=bb, drop=["lm_head.weight"])
    assert (
        "head.weight" not in headless.params and not headless.manifest.method_config["train_head"]
    )
    assert [d["tensor"] for d in headless.manifest.dropped] == ["lm_head.weight"]
    # another base: most frozen tensors differ -> a base mismatch, not a list of losses
    other = releases(tmp_path / "other-releases", seed=3)
    with pytest.raises(BackboneMismatch, match="another base"):
        import_m2pt(save_run(run_state(other), other, tmp_path / "o"), name="o", backbone=bb)
    # another architecture (LLaVA-1.5's two-layer projector on this v1 base)
    wide = {k: v for k, v in run[0].items() if "mm_projector" not in k}
    wide["model.mm_projector.0.weight"] = torch.zeros(48, 48, dtype=torch.bfloat16)
    with pytest.raises(BackboneMismatch, match="architecture"):
        import_m2pt(save_run(wide, rel, tmp_path / "wide"), name="w", backbone=bb)
    # prompts and trained parts alone: nothing to check the base with
    bare = {k: v for k, v in run[0].items() if "prompts" in k or k == "lm_head.weight"}
    torch.save(bare, tmp_path / "bare.bin")
    with pytest.raises(InvalidContent, match="cannot be checked"):
        import_m2pt(tmp_path / "bare.bin", name="b", backbone=bb)


def test_equal_means_bit_equal_through_the_references_casts() -> None:
    from service.importers.m2pt import same

    x = torch.randn(4096) * 0.1
    assert same(x.half().bfloat16(), x)  # the tower's fp32 -> fp16 -> bf16
    assert not torch.equal(x.half().bfloat16(), x.bfloat16())  # (which rounding differs on)
    assert same(x.bfloat16(), x) and same(x.half().bfloat16(), x.half())  # Vicuna's fp16
    moved = x.half().bfloat16()
    moved[17] = moved[17] * 1.05  # one element moved by training
    assert not same(moved, x) and not same(moved, x.half())


def test_the_checkpoints_template_and_the_references_tokenization(
    bb: LlavaBackbone, run: tuple[dict[str, Tensor], Path], client: TestClient
) -> None:
    plan = _plan(bb, run[1])
    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    want, _ = reference_ids(bb.tokenizer, prompt, bb.image_tokens(NV))
    want = [bb.image_token_id if t == -1 else t for t in want]
    ids = bb.encode_chat(user_message(QUESTION, True), 1, NV, plan.conversation)
    assert ids == want
    whole = bb.encode_text(prompt, 1, NV)  # one string: the chunk after <image> loses its '▁'
    assert whole != want
    # both routes use the checkpoint's template by default; an OpenAI system message replaces it
    body = {"checkpoint": "flan", "image": data_uri(COLOUR), "instruction": QUESTION}
    answer = client.post("/v1/answer", json={**body, "max_new_tokens": 6}, headers=AUTH).json()
    assert answer["usage"]["prompt_tokens"] == len(want)
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(COLOUR)}},
        {"type": "text", "text": QUESTION},
    ]
    chat = {"model": "flan", "messages": [{"role": "user", "content": content}], "max_tokens": 6}
    got = client.post("/v1/chat/completions", json={**chat, "temperature": 0}, headers=AUTH)
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["message"]["content"] == answer["answer"]
    assert got.json()["usage"]["prompt_tokens"] == len(want)
    system = [{"role": "system", "content": "Answer in one word."}, *chat["messages"]]
    brief = client.post(
        "/v1/chat/completions", json={**chat, "messages": system, "temperature": 0}, headers=AUTH
    ).json()
    assert brief["usage"]["prompt_tokens"] != len(want)
    # without the template the answer differs (the reference's own ask: 0 of 12 tokens shared)
    plain = _plan(bb, run[1], conversation="none")
    assert _tokens(bb, [plain]) != _tokens(bb, [plan])
    # the converted base's default chat template renders the same text
    messages = user_message(QUESTION, True)
    assert bb.processor.apply_chat_template(messages, add_generation_prompt=True) == prompt


def test_residency_counts_a_checkpoints_head_and_projector_bytes(
    bb: LlavaBackbone, rel: Releases, run: tuple[dict[str, Tensor], Path], tmp_path: Path
) -> None:
    from service.engine.residency import Residency

    store = open_store(f"file://{tmp_path / 'store'}")
    for i, seed in enumerate((7, 8, 9)):
        path = save_run(run_state(rel, seed=seed), rel, tmp_path / f"r{i}")
        publish(store, bb, import_m2pt(path, name=f"r{i}", backbone=bb)[1])
    plan = Residency(store, bb, AnswerPlan).resolve("r0").plan
    head = bb.head_shape[0] * bb.head_shape[1] * 4  # float32 backbone: the plan is in its dtype
    projector = (bb.text_width * bb.vision_width + bb.text_width) * 4
    prompts = (3 * NV * bb.vision_width + 3 * NT * bb.text_width) * 4
    assert plan.nbytes == head + projector + prompts
    r = Residency(store, bb, AnswerPlan, device_budget=2 * plan.nbytes, host_budget=plan.nbytes)
    for i in range(3):
        r.resolve(f"r{i}")
    health = r.health()
    assert health["device_bytes"] == 2 * plan.nbytes and r.stats.demotions == 1
    store.close()


def test_the_import_command_finds_m2pts_hook_and_reports_what_it_imported(
    base: Path, run: tuple[dict[str, Tensor], Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from service.checkpoints import parse

    out = tmp_path / "flan.safetensors"
    argv = ["import", str(run[1]), "--name", "flan", "--out", str(out), "--backbone", "llava"]
    argv += ["--model", str(base), "--pretrained", str(base), "--drop", "lm_head.weight"]
    assert main(argv) == 0  # no --method: the LLaVA methods' hooks say who reads the run
    said = capsys.readouterr().out
    assert f"{NV} visual and {NT} textual" in said and "trained projector," in said
    assert "1 dropped" in said
    manifest = parse(out.read_bytes()).manifest
    assert manifest.method == "m2pt" and manifest.dropped[0]["tensor"] == "lm_head.weight"


def test_the_import_follows_the_layout_the_method_declares(
    bb: LlavaBackbone, run: tuple[dict[str, Tensor], Path]
) -> None:
    """The reference's key vocabulary is M²PT's own declaration (its `importer`): a hook that
    does not know the textual prompts' keys makes them tensors with no place, refused by name."""
    import dataclasses
    import re

    from service.errors import InvalidContent
    from service.prompts.m2pt import M2PTOutput
    from service.prompts.registry import get_method

    hook = get_method("m2pt").importer
    assert isinstance(hook, M2PTOutput) and hook.is_prompt(TXT.format(2))
    blind = dataclasses.replace(hook, text=re.compile(r"^$"))
    with pytest.raises(InvalidContent, match="would lose") as err:
        import_m2pt(run[1], name="x", backbone=bb, layout=blind)
    assert TXT.format(0) in str(err.value) and "no place in the served model" in str(err.value)


def test_the_base_converts_from_a_saved_run_too_and_checkpoints_name_their_base(
    rel: Releases, base: Path, bb: LlavaBackbone, run: tuple[dict[str, Tensor], Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    """A run's saved model is its base in bf16 (plus its prompts, projector and head): with the
    releases' projector and head it converts to the very base the releases give at bf16. A
    checkpoint imported onto one base is refused on another (fingerprint), with a clear error."""
    from service.backbones.llava_loading import load_llava
    from service.checkpoints import load
    from service.errors import BackboneMismatch, InvalidContent
    from service.importers.llava_base import convert_base

    pieces: dict[str, Any] = {"vision_tower": rel.clip, "projector": rel.projector}
    pieces["dtype"] = "bfloat16"
    from_releases = convert_base(rel.vicuna, tmp_path / "a", **pieces)
    from_run = convert_base(
        run[1], tmp_path / "b", lm_head=rel.vicuna / "model.safetensors", **pieces
    )
    assert from_run["fingerprint"] == from_releases["fingerprint"]
    # the run's prompts are not the base's, and its copy of the tower is its bf16 cast
    not_base = [k for k in run[0] if k.startswith(("model.vision_tower.", "model.prompts."))]
    assert from_run["ignored_from_src"] == len(not_base)
    without = convert_base(run[1], tmp_path / "c", **pieces)
    assert without["fingerprint"] != from_releases["fingerprint"]  # the run's trained head in it
    with pytest.raises(InvalidContent, match="pass --projector"):
        convert_base(rel.vicuna, tmp_path / "d", vision_tower=rel.clip)
    bf16 = load_llava(str(tmp_path / "a"), str(tmp_path / "a"))
    assert bf16.fingerprint == from_releases["fingerprint"] != bb.fingerprint
    _, data = import_m2pt(run[1], name="flan", backbone=bb)
    with pytest.raises(BackboneMismatch, match=f"trained on backbone .*{bb.fingerprint[:19]}"):
        load(data, bf16)
