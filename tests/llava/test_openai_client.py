"""The official `openai` client against a real uvicorn server on 127.0.0.1 (started here)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn

from service.app import create_app
from service.backbones.llava import LlavaBackbone
from service.settings import Settings
from tests.llava.conftest import data_uri

KEY = "read-key"


@pytest.fixture
def server(llava: LlavaBackbone, tmp_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(store=f"file://{tmp_path / 'store'}", backbone="llava", api_keys=KEY)
    config = uvicorn.Config(
        create_app(settings, backbone=llava), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_openai_client_gets_a_completion_and_a_stream(server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "answer briefly"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in the image?"},
                {"type": "image_url", "image_url": {"url": data_uri((0, 0, 255))}},
            ],
        },
    ]
    done = client.chat.completions.create(
        model="plain",
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert done.object == "chat.completion" and done.usage is not None
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    text = done.choices[0].message.content
    assert text
    stream = client.chat.completions.create(
        model="plain",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == text
    with pytest.raises(openai.BadRequestError, match="never fetched"):
        client.chat.completions.create(
            model="plain",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                    ],
                }
            ],
        )
    bad = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
