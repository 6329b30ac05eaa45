"""Preference pairs from expert and explored trajectories (ETO step 3), self-play pairs, the RFT set.

The rule is METHOD.md's "Pair" step, which mirrors ETO's ``construct_preference.py``. Trajectories are
laid out ``[0] instruction, [1] acknowledgement, [2] task message, then gpt / human alternating``
(see ``fasteto.data.types``). With ``e = expert.conversations[2:]`` and ``x = explored.conversations[2:]``
(both start at the task message; a trailing human message of ``x`` is dropped, as ETO does for explored
trajectories only), per explored item:

- explored reward < expert reward ("lose"): prompt = expert[:2] + e[:1], chosen = e[1:],
  rejected = x[:len(e) + max_extra_messages][1:] (no cut when max_extra_messages is None);
- explored reward > expert reward ("win"): prompt = explored[:2] + x[:1], chosen = x[1:], rejected = e[1:];
- equal: "tie", no pair;
- a pair whose chosen or rejected is empty or does not end with a gpt message is dropped.

The expert reward is the expert item's ``reward`` when given (WebShop), else 1.0. Explored items with
reward None are skipped. Messages are shared with the input trajectories, not copied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fasteto.data.types import GPT, HUMAN, INSTRUCTION_LEN, TASK_INDEX, Message, Pair, Trajectory

# ETO cut the rejected trajectory to the expert's length + 10 messages for ScienceWorld and WebShop,
# and did not cut it for ALFWorld (METHOD.md).
DEFAULT_MAX_EXTRA_MESSAGES: dict[str, int | None] = {"sciworld": 10, "webshop": 10, "alfworld": None}

EXPERT_DEFAULT_REWARD = 1.0


@dataclass
class PairStats:
    """Counts from a pair build. ``win``/``lose`` count before the model-end drop, as ETO prints them."""

    win: int = 0
    tie: int = 0
    lose: int = 0
    skipped_none: int = 0
    no_expert: int = 0
    dropped_not_model_end: int = 0
    written: int = 0
    expert_without_explored: int = 0
    expert_duplicates: int = 0

    def summary(self) -> str:
        text = (f"win {self.win} / tie {self.tie} / lose {self.lose}; {self.written} pairs written "
                f"({self.dropped_not_model_end} dropped: not ending with a model message; "
                f"{self.skipped_none} skipped: reward None; {self.no_expert} without expert)")
        if self.expert_without_explored:
            text += f"; {self.expert_without_explored} expert ids not explored"
        if self.expert_duplicates:
            text += f"; {self.expert_duplicates} duplicate expert ids (last one kept)"
        return text


def parse_max_extra(value: str) -> int | None:
    """CLI value of ``--max-extra-messages``: ``"none"`` (no cut) or a non-negative integer."""
    text = value.strip()
    if text.lower() == "none":
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(f"--max-extra-messages: got {value!r}; expected a non-negative integer "
                     "(messages kept past the expert's length; ETO used 10) or 'none' (no cut)")


def _after_task(traj: Trajectory) -> list[Message]:
    """The expert's messages from the task message on (``e`` of the rule)."""
    return traj.conversations[TASK_INDEX:]


def _explored_after_task(traj: Trajectory) -> list[Message]:
    """``x`` of the rule: messages from the task message on, a trailing human message dropped."""
    x = traj.conversations[TASK_INDEX:]
    if x and x[-1]["from"] == HUMAN:
        x = x[:-1]
    return x


def _ends_with_model(messages: list[Message]) -> bool:
    return bool(messages) and messages[-1]["from"] == GPT


def _keep(pair: Pair, stats: PairStats, pairs: list[Pair]) -> None:
    """ETO's last step: keep the pair only if chosen and rejected both end with a model message."""
    if _ends_with_model(pair.chosen) and _ends_with_model(pair.rejected):
        pairs.append(pair)
    else:
        stats.dropped_not_model_end += 1


def _index_experts(experts: Iterable[Trajectory], stats: PairStats) -> dict[str, Trajectory]:
    by_key: dict[str, Trajectory] = {}
    for traj in experts:
        if traj.key in by_key:
            stats.expert_duplicates += 1
        by_key[traj.key] = traj  # ETO reads experts into a dict: the last one wins
    return by_key


def build_pairs(experts: Iterable[Trajectory], explored: Iterable[Trajectory],
                max_extra_messages: int | None) -> tuple[list[Pair], PairStats]:
    """ETO's pair rule (module docstring, METHOD.md step 3): one pair per explored item, in file order.

    Items are matched on ``Trajectory.key`` (the id as a string, so 3 matches "3"); several explored
    samples of one id each give a pair. ``Pair.id`` is the explored item's id.
    """
    if max_extra_messages is not None and max_extra_messages < 0:
        raise ValueError(f"max_extra_messages must be >= 0 or None, got {max_extra_messages}")
    stats = PairStats()
    by_key = _index_experts(experts, stats)
    seen: set[str] = set()
    pairs: list[Pair] = []
    for item in explored:
        seen.add(item.key)
        if item.reward is None:
            stats.skipped_none += 1
            continue
        expert = by_key.get(item.key)
        if expert is None:
            stats.no_expert += 1
            continue
        expert_reward = expert.reward if expert.reward is not None else EXPERT_DEFAULT_REWARD
        e, x = _after_task(expert), _explored_after_task(item)
        if item.reward < expert_reward:
            stats.lose += 1
            cut = x if max_extra_messages is None else x[: len(e) + max_extra_messages]
            pair = Pair(item.id, expert.conversations[:INSTRUCTION_LEN] + e[:1], e[1:], cut[1:])
        elif item.reward > expert_reward:
            stats.win += 1
            pair = Pair(item.id, item.conversations[:INSTRUCTION_LEN] + x[:1], x[1:], e[1:])
        else:
            stats.tie += 1
            continue
        _keep(pair, stats, pairs)
    stats.expert_without_explored = sum(1 for key in by_key if key not in seen)
    stats.written = len(pairs)
    return pairs, stats


def build_self_play_pairs(explored: Iterable[Trajectory]) -> tuple[list[Pair], PairStats]:
    """Pairs without experts: per id, the best explored sample (chosen) against the worst (rejected).

    Items with reward None are skipped. Best = first sample with the highest reward, worst = first with
    the lowest, in file order; equal rewards (a single sample included) are a tie. prompt =
    best[:2] + xb[:1], chosen = xb[1:], rejected = xw[1:] (trailing human messages dropped, no cut),
    then the model-end drop. Pairs are counted as ``win``; ``Pair.id`` is the best sample's id.
    """
    stats = PairStats()
    groups: dict[str, list[Trajectory]] = {}
    for item in explored:
        if item.reward is None:
            stats.skipped_none += 1
            continue
        groups.setdefault(item.key, []).append(item)
    pairs: list[Pair] = []
    for samples in groups.values():
        # max/min return the first of equal elements, which is the file-order tie-break we want.
        best = max(samples, key=lambda t: t.reward)
        worst = min(samples, key=lambda t: t.reward)
        if best.reward == worst.reward:
            stats.tie += 1
            continue
        stats.win += 1
        xb, xw = _explored_after_task(best), _explored_after_task(worst)
        _keep(Pair(best.id, best.conversations[:INSTRUCTION_LEN] + xb[:1], xb[1:], xw[1:]), stats, pairs)
    stats.written = len(pairs)
    return pairs, stats


def build_rft_set(experts: Iterable[Trajectory], explored: Iterable[Trajectory],
                  success_threshold: float = 1.0) -> list[Trajectory]:
    """The RFT training set (METHOD.md, variants): every expert item, then every explored item whose
    reward is not None and >= ``success_threshold``, with a trailing human message dropped.

    Returned as SFT trajectories; rewards and extra keys are kept (extra copied, messages shared).
    """
    out = list(experts)
    for item in explored:
        if item.reward is None or item.reward < success_threshold:
            continue
        conversations = item.conversations[:INSTRUCTION_LEN] + _explored_after_task(item)
        out.append(Trajectory(item.id, conversations, item.reward, dict(item.extra)))
    return out
