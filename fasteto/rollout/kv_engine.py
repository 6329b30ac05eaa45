"""A policy engine that keeps key/value caches between calls, so a turn costs only its new tokens.

The plain ``TransformersEngine`` re-encodes every conversation in full at every turn: turn ``t`` of an
episode costs the whole history again. ``KVCacheEngine`` formats each prompt exactly as the plain engine
does (same chat template, same truncation), looks up the longest prefix of its token ids in a
``PrefixCache`` and runs the model only on the rest:

- an ongoing episode finds its previous prompt and reply, and encodes only the reply's re-tokenised tail
  and the new observation;
- a new episode finds the instruction exchange and one-shot example of any episode of its environment.

Prompts are prefilled one at a time (no padding, and each row's prompt is in the cache before the next
row's lookup, so episodes that start together still share their common prefix); then all rows decode
together, left-padded, one token per row per step, and a row leaves the batch the moment it ends its
turn. Its cache (prompt + reply) goes back to the store for its next turn.

Greedy output equals the plain engine's: the same tokens are fed to the same model, only the order of
the arithmetic differs (tests check token identity on a real environment).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from fasteto.data.types import Message
from fasteto.rollout.engine import (
    GenerationConfig,
    decode_reply,
    encode_prompt,
    pick_tokens,
    stop_token_ids,
    until_stop,
)
from fasteto.rollout.prefix_cache import KV, CacheEntry, PrefixCache


@dataclass
class _Row:
    """One conversation being decoded: its prompt, its cache entry, the tokens generated so far."""

    prompt: np.ndarray
    entry: CacheEntry
    next_token: int = -1
    generated: list[int] | None = None


class KVCacheEngine:
    """A ``PolicyEngine`` over a Hugging Face causal LM with full attention, reusing KV across calls.

    Args:
        model, tokenizer: as for ``TransformersEngine`` (the tokenizer needs a chat template).
        batch_size: rows decoded together; more conversations are decoded in consecutive batches.
        max_context: as ``TransformersEngine`` (None: no truncation).
        cache_tokens: tokens of KV kept between calls (least recently used dropped first). Memory per
            token is ``2 · layers · kv_heads · head_dim · bytes``; for SmolLM2-135M in fp32, 46 KB.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_context: int | None = None,
                 cache_tokens: int = 65536):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_context = max_context
        self.cache = PrefixCache(cache_tokens)
        self.prefilled_tokens = 0  # tokens run through the model as prompt (for benchmarks)
        self.decoded_tokens = 0
        self._cache_name: str | None = None
        self.last_token_ids: list[list[int]] = []  # of the last generate() call, per conversation

    def update_weights(self, model: Any) -> None:
        """Use ``model`` from the next call on; the stored KV belongs to the old weights and is dropped."""
        self.model = model
        self._cache_name = None
        self.cache.clear()

    def generate(self, conversations: list[list[Message]], cfg: GenerationConfig) -> list[str]:
        """See ``PolicyEngine.generate``."""
        if not conversations:
            return []
        prompts = [np.asarray(encode_prompt(self.tokenizer, c, self.max_context, cfg.max_new_tokens),
                              dtype=np.int64) for c in conversations]
        stops = stop_token_ids(self.tokenizer, self.model)
        generator = self._generator(cfg.seed)
        replies: list[str] = []
        self.last_token_ids = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(prompts), self.batch_size):
                    rows = [self._prefill(p, cfg, generator) for p in prompts[start:start + self.batch_size]]
                    self._decode(rows, cfg, stops, generator)
                    replies += [decode_reply(self.tokenizer, row.generated, stops) for row in rows]
                    self.last_token_ids += [until_stop(row.generated, stops) for row in rows]
        finally:
            self.model.train(was_training)
        return replies

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def _prefill(self, prompt: np.ndarray, cfg: GenerationConfig, generator) -> _Row:
        """Run the uncached tail of ``prompt``; store the prompt's KV; pick the first new token."""
        source, shared = self.cache.lookup(prompt)
        n = min(shared, len(prompt) - 1)  # at least one token must run, for the next-token logits
        self.cache.count(n, len(prompt))
        past = _preallocated(source.prefix_kv(n) if n else None, len(prompt), self._num_layers())
        ids = torch.as_tensor(prompt[n:], device=self.device)[None]
        positions = torch.arange(n, len(prompt), device=self.device)[None]
        out = self._forward(input_ids=ids, position_ids=positions, cache=past)
        self.prefilled_tokens += len(prompt) - n
        continues = source is not None and n >= source.prompt_len
        entry = self.cache.put(prompt, _layers(past), prompt_len=len(prompt),
                               replaces=source if continues else None)
        row = _Row(prompt=prompt, entry=entry, generated=[])
        row.next_token = int(pick_tokens(out.logits[:, -1], cfg, generator)[0])
        return row

    def _decode(self, rows: list[_Row], cfg: GenerationConfig, stops: list[int], generator) -> None:
        """Decode ``rows`` together until each ends its turn or reaches ``cfg.max_new_tokens``."""
        past, mask = self._batch_cache(rows, cfg)
        live = list(range(len(rows)))
        lengths = torch.tensor([len(r.prompt) for r in rows], device=self.device)
        while True:
            for i in live:
                rows[i].generated.append(rows[i].next_token)
            ended = [j for j, i in enumerate(live)
                     if rows[i].next_token in stops or len(rows[i].generated) >= cfg.max_new_tokens]
            for j in ended:
                self._store(rows[live[j]], past, mask, j)
            if len(ended) == len(live):
                return
            if ended:
                keep = torch.tensor([j for j in range(len(live)) if j not in ended], device=self.device)
                past.batch_select_indices(keep)
                mask, lengths = mask[keep], lengths[keep]
                live = [live[j] for j in keep.tolist()]
            tokens = torch.tensor([[rows[i].next_token] for i in live], device=self.device)
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            out = self._forward(input_ids=tokens, attention_mask=mask, position_ids=lengths[:, None],
                                cache=past)
            lengths = lengths + 1
            self.decoded_tokens += len(live)
            picked = pick_tokens(out.logits[:, -1], cfg, generator).tolist()
            for i, token in zip(live, picked, strict=True):
                rows[i].next_token = token

    def _forward(self, cache: Cache, **inputs: torch.Tensor) -> Any:
        """The model's forward with ``cache`` (named ``cache`` since transformers 5, ``past_key_values``
        before), the logits of the last position only."""
        if self._cache_name is None:
            params = inspect.signature(self.model.forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return self.model(**inputs, **{self._cache_name: cache}, use_cache=True, logits_to_keep=1)

    def _num_layers(self) -> int:
        return self.model.config.get_text_config(decoder=True).num_hidden_layers

    def _batch_cache(self, rows: list[_Row], cfg: GenerationConfig) -> tuple[Cache, torch.Tensor]:
        """The rows' prompt KV left-padded into one cache, and the ``[B, W]`` attention mask (0 on pads)."""
        width = max(len(r.prompt) for r in rows)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            mask[b, width - len(row.prompt):] = 1
        cache = Cache(layers=[_PreallocatedLayer(width + cfg.max_new_tokens) for _ in rows[0].entry.kv])
        for index, layer in enumerate(cache.layers):
            k0, v0 = rows[0].entry.kv[index]
            layer.lazy_initialization(k0.expand(len(rows), -1, -1, -1), v0.expand(len(rows), -1, -1, -1))
            layer._k[:, :, :width].zero_()  # pads: finite values, masked out of attention
            layer._v[:, :, :width].zero_()
            for b, row in enumerate(rows):
                rk, rv = row.entry.kv[index]
                layer._k[b, :, width - rk.shape[2]:width] = rk[0]
                layer._v[b, :, width - rv.shape[2]:width] = rv[0]
            layer.length = width
            layer.keys, layer.values = layer._k[:, :, :width], layer._v[:, :, :width]
        return cache, mask

    def _store(self, row: _Row, past: Cache, mask: torch.Tensor, b: int) -> None:
        """Put row ``b``'s KV (prompt + reply so far, pads dropped) in the cache, replacing its prompt's."""
        columns = mask[b].nonzero().squeeze(-1)
        kv = [(layer.keys[b:b + 1, :, columns], layer.values[b:b + 1, :, columns])  # indexing copies
              for layer in past.layers]
        # The last generated token was picked but never run through the model: its KV does not exist.
        ids = np.concatenate([row.prompt, np.asarray(row.generated[:-1], dtype=np.int64)])
        self.cache.put(ids, kv, prompt_len=len(row.prompt), replaces=row.entry)


class _PreallocatedLayer(DynamicLayer):
    """A cache layer whose keys and values live in buffers sized for the whole call, so that each
    decoded token is written in place instead of concatenated (which would copy the whole cache at
    every step). ``keys``/``values`` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (*key_states.shape[:2], self.capacity, key_states.shape[3])
        self._k = key_states.new_empty(shape)
        self._v = value_states.new_empty((*shape[:3], value_states.shape[3]))
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} tokens overflows at {end}")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def _preallocated(kv: KV | None, capacity: int, num_layers: int) -> Cache:
    """A cache of ``num_layers`` preallocated layers of ``capacity`` tokens, holding ``kv`` if given."""
    cache = Cache(layers=[_PreallocatedLayer(capacity) for _ in range(num_layers)])
    for layer, (k, v) in zip(cache.layers, kv or [], strict=False):
        layer.update(k, v)
    return cache


def _layers(cache: Cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]
