"""Conversations to token ids and loss masks, rendered with the tokenizer's own chat template.

The rendering itself (roles, template, generation prompt) is ``data.chat``'s, shared with inference.

**Which tokens are the model's.** For the assistant message at index k, its *turn* is the text the
template adds for it after the generation prompt::

    head = render(messages[:k], add_generation_prompt=True)   # ends with the assistant header
    turn = render(messages[:k + 1])                            # head + the message's rendering

and the model's characters are ``turn[len(head):]`` (content and end-of-turn token), cut just after the
last end-of-turn token (``tokenizer.eos_token``) when the turn contains one. The rule is "what the model
generates to produce that turn": generation starts after the header and stops at the end-of-turn token,
so template glue after it (ChatML's newline after ``<|im_end|>``) is written by the engine, never by the
model, and is not trained. A turn without the eos token is marked whole. Never marked: system prompt,
instruction, task, observations, assistant headers.

**From characters to tokens.** The full conversation is rendered once and tokenised once with offsets
(``add_special_tokens=False``: the template already writes any BOS). A token is marked when its
characters overlap a model span. This needs the template to render by concatenation: every prefix
render above must be a prefix of the full render; a template that is not raises ``ValueError``.

**Truncation** (lengths in tokens): a conversation longer than ``max_length`` keeps its start. For a
pair, the prompt is never cut: a prompt longer than ``max_prompt`` raises ``PromptTooLongError``, and
``tokenize_pairs`` drops that pair and counts it. ETO's TRL run kept a long prompt's *end*
(``truncation_mode="keep_end"``), which loses the system prompt and the instruction's head, both of which
inference always shows: the policy would be trained on a context it never sees. Each continuation keeps
its first ``max_target`` tokens. A record left with no model token is returned as None and counted as
dropped by the ``tokenize_*`` helpers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedTokenizerBase

from fasteto.data.chat import render, to_chat
from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.data.types import GPT, Pair, Trajectory

Span = tuple[int, int]  # [start, end) in characters of the rendered text
NO_MODEL_TOKEN = "no model token left after truncation"
PROMPT_TOO_LONG = "prompt over max_prompt (never cut; raise --dpo.max-prompt)"


class PromptTooLongError(ValueError):
    """A DPO pair's prompt has more tokens than ``max_prompt``; prompts are never cut."""


def model_spans(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]],
                start: int = 0) -> tuple[str, list[Span]]:
    """Render ``chat`` and locate the model's characters of each assistant message at index ≥ ``start``.

    Returns (text, spans): spans sorted, disjoint, one per such message (rule in the module docstring).
    Raises ValueError when the template does not render by concatenation.
    """
    text = render(tokenizer, chat, add_generation_prompt=False)
    spans = []
    for k in range(start, len(chat)):
        if chat[k]["role"] != "assistant":
            continue
        head = render(tokenizer, chat[:k], add_generation_prompt=True)
        turn = render(tokenizer, chat[:k + 1], add_generation_prompt=False)
        if not (turn.startswith(head) and text.startswith(turn)):
            raise _not_concatenating(tokenizer, k)
        spans.append((len(head), _turn_end(tokenizer, turn, len(head))))
    return text, spans


def _turn_end(tokenizer: PreTrainedTokenizerBase, turn: str, begin: int) -> int:
    """End of the model's characters in ``turn[begin:]``: just after its last eos token, else its end."""
    eos = tokenizer.eos_token
    at = turn.rfind(eos, begin) if eos else -1
    return at + len(eos) if at >= 0 else len(turn)


def _not_concatenating(tokenizer: PreTrainedTokenizerBase, k: int) -> ValueError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(
        f"the chat template of {name} does not render conversations by concatenation: rendering the "
        f"first {k} messages (with the generation prompt) and then message {k} is not a prefix of the "
        f"full rendering, so the model's tokens cannot be located. Fix: use a model whose template "
        f"renders each message on its own (ChatML, Llama-2/3 chat), or set a chat_template that does."
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[Span]]:
    """Token ids of ``text`` (no special tokens added) and each token's character span, ``(n,)`` each."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; fasteto needs a fast "
                         f"(tokenizers-backed) tokenizer. Fix: load it with AutoTokenizer.") from exc
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def spans_to_mask(offsets: list[Span], spans: list[Span]) -> list[bool]:
    """``(n,)`` bool: token i is True when its characters overlap one of ``spans``.

    ``offsets`` are sorted by start (as tokenizers emit them); ``spans`` sorted and disjoint. Tokens
    of zero width (added specials without text) are never marked.
    """
    mask, j = [], 0
    for s, e in offsets:
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        mask.append(e > s and j < len(spans) and e > spans[j][0])
    return mask


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, traj: Trajectory,
                          max_length: int | None) -> TokenizedSequence | None:
    """One trajectory → ids ``(n,)`` and loss mask ``(n,)``, ``n ≤ max_length``; None when no model
    token is left (after truncation, or none at all)."""
    text, spans = model_spans(tokenizer, to_chat(traj.conversations))
    ids, offsets = encode(tokenizer, text)
    mask = spans_to_mask(offsets, spans)
    if max_length is not None:
        _check_positive(max_length=max_length)
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    return TokenizedSequence(id=traj.id, input_ids=ids, loss_mask=mask)


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, pair: Pair, max_prompt: int,
                  max_target: int) -> TokenizedPair | None:
    """One DPO pair → shared prompt ids ``(p,)``, ``p ≤ max_prompt``, and per continuation ids and mask
    ``(c,)``, ``c ≤ max_target``. None when chosen or rejected has no model token left;
    ``PromptTooLongError`` when the prompt has more than ``max_prompt`` tokens.

    The prompt is rendered with the generation prompt (it ends with the assistant header); a
    continuation is the rest of render(prompt + continuation). Its assistant messages are masked
    as in ``tokenize_conversation``; the prompt's own (the instruction acknowledgement) are prompt.
    """
    _check_positive(max_prompt=max_prompt, max_target=max_target)
    prompt_chat = to_chat(pair.prompt)
    prompt_text = render(tokenizer, prompt_chat, add_generation_prompt=True)
    prompt_ids, _ = encode(tokenizer, prompt_text)
    sides = {}
    for side in ("chosen", "rejected"):
        messages = getattr(pair, side)
        if not messages or messages[0].get("from") != GPT:
            raise ValueError(f"pair {pair.id!r}: {side} must start with a gpt message (it continues the "
                             f"prompt, which ends with a human message)")
        ids, mask = _continuation(tokenizer, prompt_chat, prompt_text, prompt_ids, to_chat(messages))
        ids, mask = ids[:max_target], mask[:max_target]
        if not any(mask):
            return None
        sides[side] = (ids, mask)
    if len(prompt_ids) > max_prompt:
        raise PromptTooLongError(
            f"pair {pair.id!r}: its prompt has {len(prompt_ids)} tokens, over max_prompt={max_prompt}; "
            f"prompts are never cut (inference always shows the whole instruction and task), so raise "
            f"max_prompt (--dpo.max-prompt) to at least {len(prompt_ids)}")
    return TokenizedPair(id=pair.id, prompt_ids=prompt_ids,
                         chosen_ids=sides["chosen"][0], chosen_mask=sides["chosen"][1],
                         rejected_ids=sides["rejected"][0], rejected_mask=sides["rejected"][1])


def _continuation(tokenizer: PreTrainedTokenizerBase, prompt_chat: list[dict[str, str]], prompt_text: str,
                  prompt_ids: list[int], cont_chat: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Ids and mask ``(c,)`` of render(prompt + cont) after the prompt.

    The whole text is tokenised once and split after the prompt's tokens. When the tokens merge across
    the boundary (the prompt's ids are not a prefix), the continuation text is tokenised on its own:
    that is what the model sees at generation time, where it writes new tokens after the prompt's.
    """
    text, spans = model_spans(tokenizer, prompt_chat + cont_chat, start=len(prompt_chat))
    if not text.startswith(prompt_text):
        raise _not_concatenating(tokenizer, len(prompt_chat))
    ids, offsets = encode(tokenizer, text)
    n = len(prompt_ids)
    if ids[:n] == prompt_ids:
        ids, offsets = ids[n:], offsets[n:]
    else:
        ids, offsets = encode(tokenizer, text[len(prompt_text):])
        offsets = [(s + len(prompt_text), e + len(prompt_text)) for s, e in offsets]
    return ids, spans_to_mask(offsets, spans)


def tokenize_trajectories(tokenizer: PreTrainedTokenizerBase, trajectories: Iterable[Trajectory],
                          max_length: int | None) -> tuple[list[TokenizedSequence], int]:
    """SFT data: (tokenised trajectories, number dropped for having no model token left)."""
    out, dropped = [], 0
    for traj in trajectories:
        seq = tokenize_conversation(tokenizer, traj, max_length)
        if seq is None:
            dropped += 1
        else:
            out.append(seq)
    return out, dropped


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Iterable[Pair], max_prompt: int,
                   max_target: int) -> tuple[list[TokenizedPair], Counter]:
    """DPO data: (tokenised pairs, dropped pairs counted by reason: ``PROMPT_TOO_LONG``,
    ``NO_MODEL_TOKEN``)."""
    out, dropped = [], Counter()
    for pair in pairs:
        try:
            tp = tokenize_pair(tokenizer, pair, max_prompt, max_target)
        except PromptTooLongError:
            dropped[PROMPT_TOO_LONG] += 1
            continue
        if tp is None:
            dropped[NO_MODEL_TOKEN] += 1
        else:
            out.append(tp)
    return out, dropped


def _check_positive(**limits: Any) -> None:
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1 token, got {value}")
