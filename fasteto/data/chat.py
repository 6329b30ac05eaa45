"""The one chat rendering, shared by training (``data.tokenize``) and inference (``rollout.engine``): ETO
messages through the tokenizer's own chat template. Training and inference formatting a conversation
differently would teach the model one format and query it in another; both go through these functions.

ETO's roles map to the template's: ``human`` → ``user``, ``gpt`` → ``assistant``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fasteto.data.types import GPT, HUMAN, Message

ROLES = {HUMAN: "user", GPT: "assistant"}


def to_chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    """ETO messages ``{"from", "value"}`` → chat-template messages ``{"role", "content"}``."""
    chat = []
    for i, msg in enumerate(messages):
        role = ROLES.get(msg.get("from"))
        if role is None:
            raise ValueError(f"message {i} has role {msg.get('from')!r}; ETO files use 'human' or 'gpt'")
        chat.append({"role": role, "content": msg["value"]})
    return chat


def render(tokenizer: Any, chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for ``chat`` (chat-template messages)."""
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer: Any, conversation: Sequence[Message]) -> list[int]:
    """Token ids of ``conversation`` (ETO messages) rendered for the model's next reply: the template with
    its generation prompt, tokenised without adding special tokens (the template writes its own BOS and
    turn markers), exactly as ``data.tokenize`` tokenises a training prompt."""
    return tokenizer(render(tokenizer, to_chat(conversation), add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
