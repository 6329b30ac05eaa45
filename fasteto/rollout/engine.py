"""Policy engines: the model that writes the agent's next reply, behind one small interface.

The explorer hands an engine a batch of conversations, each ending with a human message (a task or an
observation), and gets back one reply per conversation::

    replies = engine.generate(conversations, GenerationConfig(max_new_tokens=512))

A reply is the model's text up to its end of turn (the tokenizer's eos, or the chat template's
end-of-turn token such as ``<|im_end|>``), without that token, stripped. ``TransformersEngine`` is the
plain-transformers implementation: the reference that runs anywhere, CPU included. Faster engines
(prefix caching, live weight updates) implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fasteto.data.chat import prompt_ids
from fasteto.data.types import EXAMPLE, HUMAN, Message

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class TransientEngineError(RuntimeError):
    """An engine failure that may pass if the call is made again (a server restarting, a dropped
    connection). The explorer retries these; any other error from an engine ends the call at once."""


RETRYABLE_ERRORS = (TransientEngineError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class GenerationConfig:
    """How replies are decoded. ETO explores and evaluates greedily with at most 512 new tokens.

    ``temperature`` and ``top_p`` apply only when ``greedy`` is False; ``seed`` makes sampling
    reproducible (None: draw from torch's global generator).
    """

    max_new_tokens: int = 512
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None


class PolicyEngine(Protocol):
    """Anything that writes the next reply of a batch of conversations."""

    def generate(self, conversations: list[list[Message]], cfg: GenerationConfig) -> list[str]:
        """The next reply for each conversation (each ends with a human message), in order: text up
        to the end of turn, without the end-of-turn token, stripped."""
        ...


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token that ends a turn: the tokenizer's eos, the model's configured eos, and known
    end-of-turn tokens (``<|im_end|>``, ...) present in the vocabulary."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [configured] if isinstance(configured, int) else list(configured or [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    if not ids:
        raise ValueError("the tokenizer has no eos token and no known end-of-turn token; set "
                         "tokenizer.eos_token to the token that ends an assistant turn")
    return list(dict.fromkeys(ids))


def encode_prompt(tokenizer: Any, conversation: list[Message], max_context: int | None,
                  max_new_tokens: int = 0) -> list[int]:
    """Token ids of ``conversation`` formatted for the model's next reply.

    ``max_context`` bounds prompt + ``max_new_tokens``. A conversation is the instruction exchange (its
    first two messages), the in-context example (messages marked ``EXAMPLE``, if any), the task message,
    then alternating replies and observations. A prompt over the budget loses, in this order and only as
    far as needed: the whole example at once (half an example would show a task without its start),
    then whole exchanges (a reply and the observation after it), oldest first. The instruction exchange,
    the task message and the last observation are never cut, and no message is cut mid-way; a prompt
    that does not fit even so raises ValueError. ``None`` never truncates.
    """
    if not conversation or conversation[-1]["from"] != HUMAN:
        raise ValueError("a conversation given to the engine must end with a human message")
    ids = prompt_ids(tokenizer, conversation)
    if max_context is None:
        return ids
    budget = max_context - max_new_tokens
    kept = list(conversation)
    while len(ids) > budget:
        without_example = [m for m in kept if not m.get(EXAMPLE)]
        if len(without_example) < len(kept):
            kept = without_example
        elif len(kept) > 5:  # instruction, acknowledgement, task, then (reply, observation) exchanges
            kept = kept[:3] + kept[5:]
        else:
            raise ValueError(
                f"the prompt needs {len(ids)} tokens even reduced to the instruction exchange, the task "
                f"and the last observation, over max_context={max_context} minus max_new_tokens="
                f"{max_new_tokens}; raise max_context or lower max_new_tokens")
        ids = prompt_ids(tokenizer, kept)
    return ids


def pick_tokens(logits: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, V]``: argmax when greedy, else a sample at
    ``cfg.temperature`` from the smallest top set holding ``cfg.top_p`` of the probability. ``[B]`` long."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p  # the top token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def until_stop(new_tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """Freshly generated tokens up to the first stop token, without it."""
    cut = next((i for i, token in enumerate(new_tokens) if token in stops), len(new_tokens))
    return list(new_tokens[:cut])


def decode_reply(tokenizer: Any, new_tokens: Sequence[int], stops: Sequence[int]) -> str:
    """The reply text of freshly generated tokens: up to the first stop token, without it, stripped."""
    return tokenizer.decode(until_stop(new_tokens, stops), skip_special_tokens=True).strip()


class TransformersEngine:
    """A ``PolicyEngine`` over a Hugging Face causal LM and its tokenizer (which needs a chat template).

    Conversations are formatted with the chat template (``add_generation_prompt=True``), sorted by
    length, cut into micro-batches of ``batch_size``, left-padded and decoded with ``model.generate``;
    left padding does not change greedy results (position ids follow the attention mask).

    ``max_context`` bounds prompt + ``max_new_tokens`` in tokens; older exchanges are dropped to fit (see
    ``encode_prompt``). ``None`` (the default) never truncates.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_context = max_context

    def update_weights(self, model: Any) -> None:
        """Use ``model`` (e.g. the policy after a training iteration) from the next call on."""
        self.model = model

    def generate(self, conversations: list[list[Message]], cfg: GenerationConfig) -> list[str]:
        """See ``PolicyEngine.generate``. With a seed, the samples depend on the seed and on the batch
        (its conversations and ``batch_size``), not on anything drawn before the call."""
        if not conversations:
            return []
        prompts = [self.encode(c, cfg.max_new_tokens) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[str] = [""] * len(prompts)
        self.last_token_ids: list[list[int]] = [[] for _ in prompts]  # per conversation, of this call
        was_training = self.model.training
        self.model.eval()
        try:
            with self._seeded(cfg.seed), torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    for i, (text, ids) in zip(chunk, self._generate_batch([prompts[i] for i in chunk], cfg),
                                              strict=True):
                        replies[i], self.last_token_ids[i] = text, ids
        finally:
            self.model.train(was_training)
        return replies

    def encode(self, conversation: list[Message], max_new_tokens: int = 0) -> list[int]:
        """Token ids of ``conversation`` formatted for the model's next reply (see ``encode_prompt``)."""
        return encode_prompt(self.tokenizer, conversation, self.max_context, max_new_tokens)

    def _generate_batch(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[tuple[str, list[int]]]:
        """Left-pad ``prompts`` into one batch, generate; each row's reply text and new token ids."""
        stops = stop_token_ids(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        width = max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                      device=device)
        sampling = {} if cfg.greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy,
                                  eos_token_id=stops, pad_token_id=pad, **sampling)
        return [(decode_reply(self.tokenizer, row, stops), until_stop(row, stops))
                for row in out[:, width:].tolist()]

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """With a seed: draw from a generator seeded with it, and leave torch's global state as it
        was. Without one: draw from (and advance) the global generator."""
        if seed is None:
            yield
            return
        device = self.model.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
