"""Conversation templates a checkpoint was trained with (LLaVA's `conv_templates`, as data).

A checkpoint's manifest may carry its template (M²PT imports carry `llava_v1`), and the answer
routes then format requests with it instead of the processor's chat template. Only LLaVA's
two-separator style is modelled, the one its v1 templates use:

    {system}{sep}USER: <image>\\n{question}{sep}ASSISTANT: {answer}{sep2}USER: ...{sep}ASSISTANT:

The message holding the image gets `<image>\\n` in front of its stripped text (LLaVA moves the
marker there before training). With `chunked`, the text around each `<image>` is tokenized
chunk by chunk, as LLaVA's `tokenizer_image_token` does: a Llama tokenizer puts a word-start
marker and a BOS on every chunk, so tokenizing the whole string gives other ids than the model
was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.errors import BadRequest

IMAGE = "<image>"
# LLaVA-1.5's conversation format, used when a processor ships no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class Conversation(BaseModel):
    """A two-separator conversation template (LLaVA v1, Vicuna v1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(max_length=64)
    system: str = Field(max_length=4000)
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = Field(default=" ", max_length=16)
    sep2: str = Field(default="</s>", max_length=16)
    chunked: bool = Field(default=True, description="tokenize the text around <image> apart")

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text of `messages` (chat-template style dicts), ending with the assistant's
        role and ':' (the generation prompt). A leading system message replaces the system
        prompt; the others must alternate user, assistant, ..., user."""
        system = self.system
        rest = list(messages)
        if rest and rest[0].get("role") == "system":
            system = _text(rest.pop(0))
        out = system + self.sep
        for i, message in enumerate(rest):
            role = message.get("role")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise BadRequest(
                    f"message {i} is from {role!r}; the {self.name} template needs the roles to "
                    "alternate user, assistant, ... after an optional first system message"
                )
            out += f"{self.roles[i % 2]}: {_text(message)}{(self.sep, self.sep2)[i % 2]}"
        if len(rest) % 2 == 0:
            raise BadRequest("the conversation must end with a user message")
        return out + f"{self.roles[1]}:"


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    if any(p.get("type") == "image" for p in content):
        return f"{IMAGE}\n{text.replace(IMAGE, '').strip()}"
    return text


TEMPLATES = {
    # the reference's evaluation default (`--conv-mode llava_v1`)
    "llava_v1": Conversation(
        name="llava_v1",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    ),
    # what `--version v1` selects in the reference's training script (PT_full_schedule.sh)
    "vicuna_v1": Conversation(
        name="vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
}


def template(name: str) -> Conversation:
    """A known template by name (BadRequest listing the known ones)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise BadRequest(
            f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None


def chunked_ids(tokenizer: Any, text: str, image_ids: Sequence[int]) -> list[int]:
    """`tokenizer_image_token`'s ids: each chunk between `<image>` markers tokenized alone (with
    the tokenizer's special tokens), `image_ids` between them, and the BOS the tokenizer puts on
    every chunk kept only on the first."""
    chunks = [tokenizer(c, add_special_tokens=True)["input_ids"] for c in text.split(IMAGE)]
    bos = tokenizer.bos_token_id
    skip = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids: list[int] = list(chunks[0][:skip])
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend(image_ids)
        ids.extend(chunk[skip:])
    return ids


def jinja(conv: Conversation) -> str:
    """The template as a chat template (for a processor: `promptserve convert-base` makes it
    the served base's default), rendering what `render` does."""
    q = json.dumps  # JSON strings are valid jinja string literals
    user, assistant = (q(r) for r in conv.roles)
    return (
        f"{{%- set ns = namespace(system={q(conv.system)}, first=0) -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] -%}{%- set ns.first = 1 -%}{%- endif -%}"
        f"{{{{ ns.system }}}}{{{{ {q(conv.sep)} }}}}"
        "{%- for m in messages[ns.first:] -%}"
        f"{{%- if loop.index0 % 2 == 0 -%}}{{{{ {user} }}}}{{%- else -%}}{{{{ {assistant} }}}}"
        "{%- endif -%}{{ ': ' }}"
        "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
        "{%- set text = namespace(s='', image=false) -%}"
        "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{%- set text.image = true -%}"
        "{%- else -%}{%- set text.s = text.s + c['text'] -%}{%- endif -%}{%- endfor -%}"
        f"{{%- if text.image -%}}{{{{ {q(IMAGE)} + '\\n' + text.s | trim }}}}"
        "{%- else -%}{{ text.s }}{%- endif -%}{%- endif -%}"
        f"{{%- if loop.index0 % 2 == 0 -%}}{{{{ {q(conv.sep)} }}}}"
        f"{{%- else -%}}{{{{ {q(conv.sep2)} }}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {assistant} }}}}:{{%- endif -%}}"
    )
