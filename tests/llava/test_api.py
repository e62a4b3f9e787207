"""/v1/answer and /v1/chat/completions on the tiny LLaVA: streaming, batching, errors, auth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts_store import open_store
from service.app import create_app
from service.backbones.llava import LlavaBackbone
from service.checkpoints.publish import publish
from service.engine.answering import user_message
from service.engine.generation import GenerationEngine, Sampling
from service.prompts.m2pt import M2PT, PLAIN_ANSWER_PLAN
from service.settings import Settings
from tests.llava.conftest import data_uri, m2pt_blob

READ, ADMIN = "read-key", "admin-key"
AUTH = {"Authorization": f"Bearer {READ}"}
RED = data_uri((255, 0, 0))


@pytest.fixture
def make_client(llava: LlavaBackbone, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        store = f"file://{tmp_path / 'store'}"
        s = open_store(store)
        if "shapes" not in s.names():
            publish(s, llava, m2pt_blob(llava))  # type: ignore[arg-type]
        s.close()
        settings = Settings(
            store=store, backbone="llava", api_keys=READ, admin_keys=ADMIN, **overrides
        )
        client = TestClient(create_app(settings, backbone=llava))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def events(response: Any) -> list[Any]:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            body = line[6:]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


@pytest.mark.parametrize("checkpoint", [None, "shapes", "shapes@1"])
def test_streaming_gives_the_same_text_as_non_streaming(
    make_client: Callable[..., TestClient], checkpoint: str | None
) -> None:
    client = make_client()
    body = {
        "checkpoint": checkpoint,
        "image": RED,
        "instruction": "what is in the image?",
        "max_new_tokens": 12,
    }
    plain = client.post("/v1/answer", json=body, headers=AUTH)
    assert plain.status_code == 200, plain.text
    result = plain.json()
    assert result["usage"]["completion_tokens"] == 12 and result["finish_reason"] == "length"
    assert result["version"] == (None if checkpoint is None else 1)
    streamed = client.post("/v1/answer", json={**body, "stream": True}, headers=AUTH)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    evs = events(streamed)
    assert evs[-1] == "[DONE]" and evs[-2]["finish_reason"] == "length"
    assert "".join(e.get("text", "") for e in evs[:-1]) == result["answer"]
    chat = {
        "model": checkpoint or "plain",
        "temperature": 0,
        "max_tokens": 12,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": RED}},
                    {"type": "text", "text": "what is in the image?"},
                ],
            }
        ],
    }
    completion = client.post("/v1/chat/completions", json=chat, headers=AUTH).json()
    assert completion["choices"][0]["message"]["content"] == result["answer"]
    chunks = events(
        client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH)
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == result["answer"] and chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_the_checkpoint_changes_the_answer(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    body = {"image": RED, "instruction": "describe the colour", "max_new_tokens": 10}
    plain = client.post("/v1/answer", json=body, headers=AUTH).json()["answer"]
    tuned = client.post("/v1/answer", json={**body, "checkpoint": "shapes"}, headers=AUTH)
    assert tuned.json()["answer"] != plain


def test_bad_requests_get_4xx_from_the_error_table(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    remote = {
        "model": "plain",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}
                ],
            }
        ],
    }
    r = client.post("/v1/chat/completions", json=remote, headers=AUTH)
    assert r.status_code == 400 and "never fetched" in r.json()["error"]["message"]
    ok = {"instruction": "hi", "max_new_tokens": 2}
    assert client.post("/v1/answer", json=ok).status_code == 401
    assert (
        client.post("/v1/answer", json=ok, headers={"Authorization": "Bearer x"}).status_code == 401
    )
    assert (
        client.post("/v1/answer", json={**ok, "checkpoint": "nope"}, headers=AUTH).status_code
        == 404
    )
    assert (
        client.post("/v1/answer", json={**ok, "max_new_tokens": 10**6}, headers=AUTH).status_code
        == 400
    )
    assert client.post("/v1/answer", json={**ok, "image": "%%%"}, headers=AUTH).status_code == 400
    assert (
        client.post("/v1/answer", json={**ok, "image": "aGVsbG8="}, headers=AUTH).status_code == 415
    )
    assert client.post("/v1/answer", json={"instruction": ""}, headers=AUTH).status_code == 422
    two = {
        "model": "plain",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED}}] * 2}
        ],
    }
    assert client.post("/v1/chat/completions", json=two, headers=AUTH).status_code == 413


def test_deadline_is_a_504(make_client: Callable[..., TestClient]) -> None:
    client = make_client(request_timeout_s=0.001)
    r = client.post("/v1/answer", json={"instruction": "hi", "max_new_tokens": 200}, headers=AUTH)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_a_batch_gives_the_answers_of_the_requests_one_by_one(llava: LlavaBackbone) -> None:
    method = M2PT()
    cfg = method.config({})
    plans = [
        method.materialize(
            {k: v * 50 for k, v in method.init(llava, cfg, seed=s).items()}, llava, cfg
        )
        for s in (1, 2)
    ]
    questions = ["what is in the image?", "colour?", "how many shapes are there in it?", "hi"]
    pixels = llava.pixel_values(
        [__import__("PIL.Image").Image.new("RGB", (40, 40), (9, 200, 9))]
    ).cpu()
    reqs = [
        (
            llava.encode_chat(user_message(q, i % 2 == 0), int(i % 2 == 0), plans[i % 2].n_visual),
            pixels if i % 2 == 0 else None,
            plans[i % 2],
        )
        for i, q in enumerate(questions)
    ]

    async def run(batch: int) -> tuple[list[list[int]], list[int]]:
        engine = GenerationEngine(llava, max_batch_size=batch, max_wait_ms=100)
        await engine.start()
        outs = await asyncio.gather(
            *(engine.complete(ids, px, plan, Sampling(max_new_tokens=8)) for ids, px, plan in reqs)
        )
        await engine.stop()
        return [t for t, _ in outs], engine.batches

    batched, sizes = asyncio.run(run(8))
    alone, single = asyncio.run(run(1))
    assert max(sizes) == 4 and single == [1, 1, 1, 1]
    assert batched == alone
    assert batched[0] != batched[2] or reqs[0][0] != reqs[2][0]


def test_queue_bound_is_a_429(llava: LlavaBackbone) -> None:
    from service.errors import Overloaded

    async def run() -> None:
        engine = GenerationEngine(llava, max_batch_size=1, max_queue=1, max_wait_ms=0)
        await engine.start()
        ids = llava.encode_chat(user_message("hi", False), 0)

        def submit() -> asyncio.Future[object]:
            return asyncio.ensure_future(
                engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(60))
            )

        slow = [submit()]
        while not engine.batches:  # the first is running
            await asyncio.sleep(0.001)
        slow.append(submit())
        while engine.queue_depth < 1:  # the second is waiting
            await asyncio.sleep(0.001)
        with pytest.raises(Overloaded):
            await engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(1))
        assert [len(t) for t, _ in await asyncio.gather(*slow)] == [60, 60]  # type: ignore[misc]
        await engine.stop()

    asyncio.run(run())
