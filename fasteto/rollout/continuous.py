"""The continuous engine: rows join and leave the running batch at any token step.

``KVCacheEngine`` decodes a fixed batch per call: every row waits for the longest reply, then the
environments step while the model idles. ``ContinuousEngine`` schedules tokens, not calls:

- ``submit(conversation, cfg, key)`` queues a row; it joins at the next ``step()``;
- ``step()`` is one forward of the model over a *packed step* (``fasteto.rollout.slot_kv``): the
  uncached tail of every joining row's prompt and one token of every decoding row, end to end, so the
  weights are read once per step for all of them; it returns the rows that ended their turn;
- a row's keys and values stay in its slot between turns, so the next turn runs only the reply's
  re-tokenised tail and the new observation. A new episode copies the longest prefix any slot holds
  (the instruction exchange and one-shot example of its environment) instead of recomputing it.

The explorer hands a finished reply to its environment and goes on stepping the other rows; when the
observation comes back, the episode's next prompt joins the running batch (``explore`` with this
engine). ``generate`` (the ``PolicyEngine`` call) submits a batch and steps until it is done.

Greedy replies equal the plain engine's (the same tokens through the same model; only the order of the
arithmetic differs, tests check token identity). Sampled rows each draw from their own generator,
seeded per request, so a sample does not depend on which other rows shared its steps.
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasteto.data.types import Message
from fasteto.ops.decode_attention.api import resolve as resolve_attention
from fasteto.rollout import lean_forward, packed_linear
from fasteto.rollout.engine import (
    GenerationConfig,
    decode_reply,
    encode_prompt,
    pick_tokens,
    stop_token_ids,
    until_stop,
)
from fasteto.rollout.prefix_cache import common_prefix
from fasteto.rollout.slot_kv import PackedStep, SlotStore, kv_shape, slot_attention
from fasteto.utils.choices import record_choice

DEFER_MIN_TOKENS = 64  # a joining row waits a step when a row joining before it will hold this much more


@dataclass
class Reply:
    """A finished turn: ``token_ids`` are the generated ids without the end-of-turn token."""

    key: Hashable
    text: str
    token_ids: list[int]


@dataclass
class _Row:
    key: Hashable
    slot: int
    prompt: np.ndarray
    cfg: GenerationConfig
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    joined: bool = False  # prefilled; the next step feeds generated[-1]


class ContinuousEngine:
    """A ``PolicyEngine`` over a Hugging Face causal LM with full attention (Llama, Qwen2, Mistral
    families), scheduling rows per token step.

    Args:
        model, tokenizer: as for ``TransformersEngine``. Each step switches this model instance to slot
            attention and back (``slot_kv.slot_attention``), so the model can be shared.
        slots: rows that can hold KV at once (the explorer's concurrency is enough: each episode keeps
            its slot until it ends). Memory: ``slots · tokens · 2 · layers · kv_heads · head_dim · bytes``.
        max_context: as ``TransformersEngine`` (None: no truncation).
        attention: the decoding rows' attention backend (``fasteto.ops.decode_attention``): ``auto``,
            ``native``, ``torch`` or ``reference``; resolved once here (``auto`` records its choice).
        linear: the linear layers (``fasteto.rollout.packed_linear``): ``onednn`` (weights packed once per
            ``update_weights``; one more copy of them in memory), ``torch`` (``F.linear``) or ``auto``
            (``onednn`` for bf16 weights on the CPU, where it is bit-identical; recorded).
        forward: the model's forward (``fasteto.rollout.lean_forward``): ``lean`` (Llama family: plain
            tensor calls over weights gathered once per ``update_weights``, q/k/v and gate/up as one
            matmul each), ``hf`` (the model's own modules) or ``auto`` (``lean`` for a supported model with
            ``onednn`` linears; recorded).
    """

    def __init__(self, model: Any, tokenizer: Any, slots: int = 8, max_context: int | None = None,
                 attention: str = "auto", linear: str = "auto", forward: str = "auto"):
        if slots < 1:
            raise ValueError(f"slots must be ≥ 1, got {slots}")
        self.tokenizer = tokenizer
        self.num_slots = slots
        self.max_context = max_context
        self.prefilled_tokens = 0  # prompt tokens run through the model
        self.copied_tokens = 0  # prompt tokens whose KV was copied from another slot instead
        self.decoded_tokens = 0
        self.forwards = 0
        self.context_tokens = 0  # slot positions the steps' rows attended to, summed over rows and steps
        self.last_token_ids: list[list[int]] = []  # of the last generate() call, per conversation
        self.attention = resolve_attention(attention, next(model.parameters()).device)
        self.linear_option, self.forward_option = linear, forward
        self.update_weights(model)

    def update_weights(self, model: Any) -> None:
        """Use ``model`` from the next step on; every slot's KV belongs to the old weights and is dropped,
        and the linears are packed again (``onednn``)."""
        self.model = model
        param = next(model.parameters())
        self.linear = packed_linear.resolve(self.linear_option, param.dtype, param.device)
        self.forward_impl = lean_forward.resolve(self.forward_option, model, self.linear)
        self.lean = self.packed = None
        if self.forward_impl == "lean":
            self.lean = lean_forward.LeanLlama(model, self.num_slots, onednn=self.linear == "onednn")
        elif self.linear == "onednn":
            self.packed = packed_linear.PackedLinears(model, self.num_slots)
        self.stops = stop_token_ids(self.tokenizer, model)
        layers, heads, dim = kv_shape(model)
        self.store = SlotStore(layers, self.num_slots, heads, dim, param.dtype, param.device,
                               limit=self.max_context)
        self.owner: list[Hashable | None] = [None] * self.num_slots
        self.used = [0] * self.num_slots
        self.rows: list[_Row] = []

    # Continuous interface ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Rows are queued or decoding."""
        return bool(self.rows)

    def free_slots(self) -> int:
        return sum(o is None for o in self.owner)

    def submit(self, conversation: list[Message], cfg: GenerationConfig, key: Hashable,
               seed: int | None = None) -> None:
        """Queue the next reply of ``conversation`` (ending with a human message); it joins at the next
        ``step()``. ``key`` names the episode: it keeps its slot (and KV) until ``release(key)``. ``seed``
        seeds this row's sampling (ignored when greedy)."""
        prompt = np.asarray(encode_prompt(self.tokenizer, conversation, self.max_context, cfg.max_new_tokens),
                            dtype=np.int64)
        if any(row.key == key for row in self.rows):
            raise ValueError(f"episode {key!r} already has a reply in progress")
        slot = self._slot_for(key, prompt)
        generator = None
        if not cfg.greedy and seed is not None:
            generator = torch.Generator(device=self.store.device).manual_seed(seed)
        self.rows.append(_Row(key, slot, prompt, cfg, generator))

    def release(self, key: Hashable) -> None:
        """``key``'s episode is over: its slot may take another row (its KV stays, for prefix reuse)."""
        for s, owner in enumerate(self.owner):
            if owner == key:
                self.owner[s] = None

    def step(self) -> list[Reply]:
        """One forward over every joining and decoding row; the rows that ended their turn."""
        rows, segments = self._schedule()
        if not rows:
            return []
        step = PackedStep.build(self.store, [s for s, _, _ in segments], [a for _, a, _ in segments],
                                [len(t) for _, _, t in segments], self.attention)
        ids = torch.as_tensor(np.concatenate([t for _, _, t in segments]), device=self.store.device)
        with torch.no_grad():
            logits = self._forward(ids, step)
        self.forwards += 1
        self.context_tokens += sum(start + len(tokens) for _, start, tokens in segments)
        for row, (slot, start, tokens) in zip(rows, segments, strict=True):
            self.store.valid[slot] = np.concatenate([self.store.valid[slot][:start], tokens])
            row.joined = True
        return self._advance(rows, logits)

    # PolicyEngine ------------------------------------------------------------------------------------

    def generate(self, conversations: list[list[Message]], cfg: GenerationConfig) -> list[str]:
        """See ``PolicyEngine.generate``. More conversations than slots are run as slots free up."""
        texts: list[str | None] = [None] * len(conversations)
        ids: list[list[int]] = [[] for _ in conversations]
        waiting = list(range(len(conversations)))
        while waiting or self.busy:
            while waiting and self.free_slots():
                i = waiting.pop(0)
                seed = None if cfg.seed is None else cfg.seed * 1_000_003 + i
                self.submit(conversations[i], cfg, key=("generate", i), seed=seed)
            if waiting and not self.busy:
                raise RuntimeError(f"all {self.num_slots} slots are held by submitted episodes; release() "
                                   "them before generate()")
            for reply in self.step():
                i = reply.key[1]
                texts[i], ids[i] = reply.text, reply.token_ids
                self.release(reply.key)
        self.last_token_ids = ids
        return [t or "" for t in texts]

    # Internals ---------------------------------------------------------------------------------------

    def _slot_for(self, key: Hashable, prompt: np.ndarray) -> int:
        """``key``'s own slot, else the free slot sharing the longest prefix with ``prompt`` (least
        recently used among equals), now owned by ``key``."""
        if key in self.owner:
            return self.owner.index(key)
        free = [s for s in range(self.num_slots) if self.owner[s] is None]
        if not free:
            raise RuntimeError(f"all {self.num_slots} slots hold episodes; release() one, or make the engine "
                               "with more slots")
        slot = max(free, key=lambda s: (common_prefix(self.store.valid[s], prompt), -self.used[s]))
        self.owner[slot] = key
        return slot

    def _schedule(self) -> tuple[list[_Row], list[tuple[int, int, np.ndarray]]]:
        """The rows of the next step and their segments (slot, start position, new token ids)."""
        rows, segments, joining = [], [], []
        for row in self.rows:
            if row.joined:
                rows.append(row)
                segments.append((row.slot, len(self.store.valid[row.slot]), np.asarray([row.generated[-1]])))
                continue
            start = self._prefix_for(row, joining)
            if start is None:
                continue  # waits one step: a row joining now will hold its prefix
            joining.append(row.prompt)
            self.store.reserve(len(row.prompt) + row.cfg.max_new_tokens)
            rows.append(row)
            segments.append((row.slot, start, row.prompt[start:]))
            self.prefilled_tokens += len(row.prompt) - start
        self.decoded_tokens += sum(r.joined for r in rows)
        return rows, segments

    def _prefix_for(self, row: _Row, joining: list[np.ndarray]) -> int | None:
        """Bring the longest cached prefix of ``row.prompt`` into its slot and return its length, or None
        when a row joining in this step holds ``DEFER_MIN_TOKENS`` more of it than any slot."""
        own = common_prefix(self.store.valid[row.slot], row.prompt)
        others = [(common_prefix(self.store.valid[s], row.prompt), s) for s in range(self.num_slots)
                  if s != row.slot]
        best, source = max(others, default=(0, -1))
        pending = max((common_prefix(p, row.prompt) for p in joining), default=0)
        if pending >= max(own, best) + DEFER_MIN_TOKENS:
            return None
        if best > own:
            self.store.copy_prefix(source, row.slot, best)
            self.copied_tokens += best - own
            own = best
        start = min(own, len(row.prompt) - 1)  # at least one token runs, for the next-token logits
        self.store.valid[row.slot] = self.store.valid[row.slot][:start]
        self.used[row.slot] = self.forwards + 1
        return start

    def _forward(self, ids: torch.Tensor, step: PackedStep) -> torch.Tensor:
        """Logits ``[R, V]`` at each segment's last token."""
        if self.lean is not None:
            return self.lean(ids, step)
        was_training = self.model.training
        self.model.eval()
        try:
            with slot_attention(self.model), self.packed.routed() if self.packed else nullcontext():
                out = self.model(input_ids=ids[None], position_ids=step.position_ids, cache=step,
                                 use_cache=True, slot_step=step, logits_to_keep=step.last)
        finally:
            self.model.train(was_training)
        return out.logits[0]

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[Reply]:
        """Pick each row's next token; finish the rows that ended their turn."""
        picked = _pick_rows(rows, logits)
        done = []
        for row, token in zip(rows, picked, strict=True):
            row.generated.append(token)
            if token in self.stops or len(row.generated) >= row.cfg.max_new_tokens:
                done.append(row)
        for row in done:
            self.rows.remove(row)
        return [Reply(r.key, decode_reply(self.tokenizer, r.generated, self.stops),
                      until_stop(r.generated, self.stops)) for r in done]


def _pick_rows(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """Next token per row: one argmax for the greedy rows, each sampled row from its own generator."""
    picked = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if not row.cfg.greedy:
            picked[i] = int(pick_tokens(logits[i:i + 1], row.cfg, row.generator)[0])
    return picked



def cpu_has_bf16() -> bool:
    """The CPU computes bfloat16 natively (AVX-512 BF16 or AMX; Linux's /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_dtype(option: str, model_dtype: torch.dtype, device: str = "cpu") -> torch.dtype:
    """The continuous engine's weight dtype for ``--explore.dtype`` (see ``ExploreConfig.dtype``)."""
    if option == "auto":
        native = device == "cuda" or cpu_has_bf16()
        chosen = torch.bfloat16 if native else model_dtype
        why = ("CUDA" if device == "cuda" else "the CPU has AVX-512 BF16 or AMX") if native else \
            "no bf16 hardware found in /proc/cpuinfo: the model's dtype"
        record_choice(f"explore.dtype ({device})", str(chosen).removeprefix("torch."), why)
        return chosen
    return {"model": model_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[option]
