"""TRL's ``DPOTrainer`` with its per-token log-probs computed by fasteto's fused op, and optional
model-token masks for multi-turn continuations. Tested with ``trl>=1.16.0,<1.17.0``.

How it plugs in: TRL 1.16's ``DPOTrainer`` never asks the model for logits. ``trl.trainer.utils.
add_fused_lm_head`` gives the model instance a forward that, called as ``model(..., labels=labels,
fused_lm_head=True)``, returns a ``FusedCausalLMOutput`` of per-token log-probs (plus entropy, mean logit and
top-1 flags for its metrics), and every policy and reference forward of the trainer goes through that call.
:class:`FusedDPOTrainer` adds its own head with the same contract (:func:`add_fasteto_lm_head`) on top of
TRL's, per instance and reversibly (:func:`remove_fasteto_lm_head`; a call without ``fused_lm_head`` falls
through to the forward it replaced, so generation is unchanged). It runs the model body for the final hidden
states and ``fused_token_logprobs`` on the completion positions only. Tokenisation, the loss types, the
reference model (or the disabled adapter under PEFT), precomputed reference log-probs and metric names all
stay TRL's.

Metrics: ``logits/chosen`` and ``logits/rejected`` are exact and cheap (the mean logit over the vocabulary is
``h · mean_v(W) + mean(b)``). ``entropy`` and ``mean_token_accuracy`` need the whole next-token distribution,
which the fused op never forms: they are not logged (the output carries NaN entropy and all-False top-1).

Refused, with an error naming the option: ``use_weighting=True`` (WPO needs ``log Σ p²``); MoE router
auxiliary loss (``router_aux_loss_coef``); LM heads that are not a plain ``nn.Linear`` (e.g. a PEFT adapter
or ``modules_to_save`` on ``lm_head``); configs that transform the logits (softcapping, logit scales);
vision-language models; pre-shifted ``shift_labels`` (context parallelism); sharded LM heads (FSDP2
DTensors, DeepSpeed ZeRO-3). Prompt-learning PEFT is untested.

``model_tokens_only=True`` (conversational data only): in ETO a chosen or rejected continuation is several
turns, assistant replies interleaved with environment observations as user turns, and stock TRL trains on
every continuation token. With it, only the assistant messages' tokens (what the model writes after the
template's generation prompt, up to and including its end-of-turn token; fasteto's own rule) count in the
log-prob sums, so everything
that reads TRL's ``completion_mask`` (sums, ``ipo``/``sigmoid_norm`` lengths, ``sft``) sees model tokens
only. The mask is derived per record in dataset preprocessing (:func:`model_token_mask`, exact or an error
naming the record) and applied by the collator (:class:`ModelTokenCollator`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from packaging.version import Version
from torch import nn

from fasteto.ops.logprob import fused_token_logprobs

TESTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [low, high)
_INSTALL_HINT = "pip install trl==1.16.0 (or fasteto's bench extra: pip install -e '.[bench]')"


def check_trl_version(version: str) -> None:
    """Raise ImportError below the tested range, warn above it."""
    low, high = TESTED_TRL
    if Version(version) < low:
        raise ImportError(f"fasteto.integrations.trl needs trl>={low}, whose DPOTrainer scores tokens "
                          f"through the fused LM head this module replaces; found trl {version}. "
                          f"{_INSTALL_HINT}")
    if Version(version) >= high:
        warnings.warn(f"fasteto.integrations.trl is tested with trl>={low},<{high}; found trl {version}. "
                      "It relies on DPOTrainer's fused_lm_head call, _prepare_dataset and _metrics; "
                      f"compare a step against trl.DPOTrainer, or {_INSTALL_HINT}", stacklevel=2)


try:
    import trl
except ImportError as error:
    raise ImportError(f"fasteto.integrations.trl needs TRL, which is not installed: {_INSTALL_HINT}") \
        from error
check_trl_version(trl.__version__)

from accelerate.utils import is_peft_model  # noqa: E402  (after the version check, on purpose)
from transformers import PreTrainedTokenizerBase  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.data_utils import is_conversational  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

# Config fields with which a model's logits are not ``h @ W.T + b`` (those TRL's own fused head honours).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
# TRL metrics that need the whole next-token distribution; FusedDPOTrainer does not log them.
NOT_LOGGED = ("entropy", "mean_token_accuracy")
MASK_COLUMNS = ("chosen_model_mask", "rejected_model_mask")
RECORD_COLUMN = "fasteto_record"  # a record's index in the dataset as given, for error messages
_MARK = "_fasteto_lm_head"  # instance attribute holding what add_fasteto_lm_head replaced


# --- The fused LM head ---------------------------------------------------------------------------------


def plain_lm_head(model: nn.Module) -> nn.Linear:
    """The LM head of a text causal LM (a transformers ``PreTrainedModel``, not a PEFT wrapper) whose
    logits are ``h @ W.T + b``; raises naming the offending option otherwise."""
    name, config = type(model).__name__, model.config
    if config.get_text_config() is not config:
        raise NotImplementedError(f"{name} is a vision-language model; FusedDPOTrainer supports text causal "
                                  "LMs only. Use trl.DPOTrainer")
    head = model.get_output_embeddings()
    if head is None or hasattr(head, "base_layer") or type(head) is not nn.Linear:
        kind = "no output embeddings" if head is None else f"a {type(head).__name__} LM head"
        raise NotImplementedError(
            f"{name} has {kind}, not a plain nn.Linear; the fused op reads lm_head.weight directly. Remove "
            "'lm_head' from the PEFT target_modules / modules_to_save, or use trl.DPOTrainer")
    for field in LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"{name} has config.{field}={value!r}, which changes its logits; "
                                      "the fused op computes plain h @ W.T + b. Use trl.DPOTrainer for this "
                                      "model")
    return head


def add_fasteto_lm_head(model: nn.Module, impl: str = "auto") -> None:
    """Give ``model`` (a text causal LM, the base model under PEFT) a forward that, called as
    ``model(..., labels=labels, fused_lm_head=True)``, returns TRL's ``FusedCausalLMOutput`` computed by
    :func:`fused_causal_lm_output`; other calls go to the forward it replaces (TRL's fused head, if any).

    Per instance; calling it again only updates ``impl``; :func:`remove_fasteto_lm_head` undoes it.
    ``impl`` is ``fused_token_logprobs``'s backend, validated by the op on the first call.
    """
    if getattr(model, _MARK, None) is not None:
        getattr(model, _MARK)["impl"] = impl
        return
    plain_lm_head(model)
    if model.base_model is model:
        raise NotImplementedError(f"{type(model).__name__} has no separate model body (base_model_prefix "
                                  f"{model.base_model_prefix!r}) to take hidden states from")
    state = {"impl": impl, "had_own_forward": "forward" in model.__dict__, "previous": model.forward}

    @functools.wraps(type(model).forward)  # inspect (and so generate()) sees the class's signature, as TRL's
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels,
                      "num_items_in_batch": num_items_in_batch}
            return state["previous"](*args, **{k: v for k, v in passed.items() if v is not None}, **kwargs)
        if shift_labels is not None:
            raise NotImplementedError("pre-shifted shift_labels (context/sequence parallelism) are not "
                                      "supported by the fasteto LM head; use trl.DPOTrainer")
        if labels is None:
            raise ValueError("model(..., fused_lm_head=True) needs labels [B, T] (-100 where not scored)")
        if kwargs.get("output_router_logits"):
            raise NotImplementedError("the MoE router auxiliary loss is not supported by the fasteto LM "
                                      "head; set router_aux_loss_coef=0.0 in DPOConfig or use trl.DPOTrainer")
        kwargs["use_cache"] = False
        # Looked up per call: FSDP and PEFT may replace modules after this head is added.
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return fused_causal_lm_output(hidden, labels, self.get_output_embeddings(), state["impl"],
                                      num_items_in_batch)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, state)


def remove_fasteto_lm_head(model: nn.Module) -> None:
    """Undo :func:`add_fasteto_lm_head` (no-op when it was not added)."""
    state = model.__dict__.pop(_MARK, None)
    if state is None:
        return
    if state["had_own_forward"]:
        model.forward = state["previous"]
    else:
        del model.forward


def fused_causal_lm_output(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear, impl: str,
                           num_items_in_batch: int | torch.Tensor | None = None) -> FusedCausalLMOutput:
    """TRL's fused-head output from the model body's last hidden states.

    Args:
        hidden: ``[B, T, D]`` final hidden states (after the last norm), any float dtype.
        labels: ``[B, T]`` long, ``-100`` where a token is not scored (TRL's ``labels``: the completion).
        head: the LM head (``plain_lm_head``); its weight ``[V, D]`` may be tied to the input embedding.
        impl: ``fused_token_logprobs`` backend.

    Returns:
        ``FusedCausalLMOutput`` with, per position ``t < T - 1`` (predicting token ``t + 1``), ``[B, T-1]``:
        ``log_probs`` float32 (differentiable; 0 where unscored), ``mean_logits`` float32 (no grad),
        ``label_mask`` bool; ``entropy`` all NaN and ``is_top1`` all False (not computed);
        ``log_sum_sq_probs`` None; ``loss`` the mean negative log-prob of the scored tokens.
    """
    weight, bias = head.weight, head.bias
    if type(weight) not in (nn.Parameter, torch.Tensor) or hasattr(weight, "ds_id"):
        raise NotImplementedError(f"lm_head.weight is a {type(weight).__name__} (sharded by FSDP2 or "
                                  "DeepSpeed ZeRO-3?); the fasteto LM head needs the whole weight. Use "
                                  "trl.DPOTrainer")
    hidden = hidden[:, :-1].to(weight.device)
    targets = labels[:, 1:].to(weight.device)
    mask = targets != -100
    rows = hidden[mask]
    picked = fused_token_logprobs(rows, weight, targets[mask], bias, impl=impl)
    # masked_scatter keeps an all-unscored micro-batch connected to the graph (a differentiable zero).
    log_probs = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
    with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
        mean = rows.float() @ weight.float().mean(0)
        if bias is not None:
            mean = mean + bias.float().mean()
        mean_logits = mean.new_zeros(mask.shape).masked_scatter(mask, mean)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=torch.full(mask.shape, float("nan"), device=mask.device),
        mean_logits=mean_logits,
        is_top1=torch.zeros_like(mask),
        label_mask=mask,
    )


# --- Model-token masks ---------------------------------------------------------------------------------


class MaskError(ValueError):
    """A record's model-token mask cannot be derived exactly from the chat template."""


def model_token_mask(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[dict],
    completion: Sequence[dict],
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """1 for each token of ``completion_ids`` that an assistant message of ``completion`` contributes, else 0.

    ``prompt_ids + completion_ids`` is TRL's tokenisation of ``prompt + completion`` (``prompt_ids`` being
    TRL's, possibly shortened, prompt). For each assistant message ``j``, its model tokens are those after
    the template's rendering of ``messages[:j]`` with the generation prompt, up to the end of the rendering
    of ``messages[:j+1]``, cut just after the last end-of-turn token (``tokenizer.eos_token``) in that
    span: what the model generates for the turn, not the template's glue after it (ChatML's newline after
    ``<|im_end|>``), the same rule as ``fasteto.data.tokenize``. Both renderings must be token prefixes of
    TRL's sequence, else ``MaskError`` (a template that re-renders earlier turns, or tokens merging across
    a turn boundary). Assistant messages in the prompt never count (TRL never trains on the prompt).

    Returns:
        ``len(completion_ids)`` ints in {0, 1}.
    """
    full = list(prompt_ids) + list(completion_ids)
    messages = list(prompt) + list(completion)
    eos = tokenizer.eos_token_id
    mask = [0] * len(full)
    for j in range(len(prompt), len(messages)):
        if messages[j]["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:j], True, template_kwargs)
        end = _render(tokenizer, messages[:j + 1], False, template_kwargs)
        for ids, what in ((start, f"messages[:{j}] plus the generation prompt"),
                          (end, f"messages[:{j + 1}]")):
            if full[:len(ids)] != ids:
                at = next((i for i, (a, b) in enumerate(zip(full, ids, strict=False)) if a != b),
                          min(len(full), len(ids)))
                raise MaskError(f"the template's tokens for {what} are not a prefix of the whole "
                                f"conversation's (they differ from token {at} on), so message {j} "
                                "(assistant) has no exact span")
        stop = len(end)
        if eos is not None and eos in full[len(start):len(end)]:  # cut the template's glue after it
            stop = len(end) - full[len(start):len(end)][::-1].index(eos)
        mask[len(start):stop] = [1] * (stop - len(start))
    return mask[len(prompt_ids):]


def _render(tokenizer, messages, add_generation_prompt, template_kwargs) -> list[int]:
    # The same call TRL's dataset preprocessing makes (trl.data_utils._tokenize), through the public API.
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt,
                                        **(template_kwargs or {}))
    return list(out["input_ids"])


def _record_index(example: dict, index: int) -> dict:
    return {RECORD_COLUMN: index}


def _add_model_masks(example: dict, tokenizer: PreTrainedTokenizerBase, dataset_name: str) -> dict:
    """``dataset.map`` function over TRL's tokenised records: the two ``MASK_COLUMNS``."""
    record = f"{dataset_name} dataset record {example.get(RECORD_COLUMN, '?')}"
    if not is_conversational(example):
        raise ValueError(f"{record}: model_tokens_only=True needs conversational data (prompt / chosen / "
                         "rejected as lists of {'role', 'content'} messages); pass model_tokens_only=False")
    tools = example.get("tools")
    template_kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                       **(example.get("chat_template_kwargs") or {})}
    out = {}
    for side in ("chosen", "rejected"):
        try:
            out[f"{side}_model_mask"] = model_token_mask(tokenizer, example["prompt"], example[side],
                                                         example["prompt_ids"], example[f"{side}_ids"],
                                                         template_kwargs)
        except MaskError as error:
            raise ValueError(f"{record}, {side}: cannot derive its model-token mask: {error}. "
                             "model_tokens_only=True needs a chat template that renders every prefix of a "
                             "conversation as a token prefix of the whole; fix the template or the record, "
                             "or pass model_tokens_only=False") from None
    return out


@dataclasses.dataclass
class ModelTokenCollator(DataCollatorForPreference):
    """TRL's ``DataCollatorForPreference`` whose ``completion_mask`` ``[2B, T]`` (long; chosen rows first)
    marks only model tokens: each example's ``chosen_model_mask`` / ``rejected_model_mask`` (0/1 per
    completion token), truncated and right-padded exactly as TRL's mask."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if any(column not in examples[0] for column in MASK_COLUMNS):
            raise KeyError(f"ModelTokenCollator needs the {MASK_COLUMNS} columns that FusedDPOTrainer("
                           "model_tokens_only=True) adds in dataset preprocessing; use that trainer")
        masks = [[0] * len(ex["prompt_ids"]) + list(ex[f"{side}_model_mask"])
                 for side in ("chosen", "rejected") for ex in examples]
        if self.max_length is not None:
            keep_start = self.truncation_mode == "keep_start"  # else "keep_end" (super() checked it)
            cut = slice(None, self.max_length) if keep_start else slice(-self.max_length, None)
            masks = [m[cut] for m in masks]
        completion_mask = torch.zeros_like(output["completion_mask"])
        for row, mask in enumerate(masks):
            completion_mask[row, :len(mask)] = torch.tensor(mask, dtype=completion_mask.dtype)
        output["completion_mask"] = completion_mask
        return output


# --- The trainer ---------------------------------------------------------------------------------------


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with per-token log-probs from ``fused_token_logprobs`` (see the module docstring).

    Takes ``DPOTrainer``'s arguments (those after ``processing_class`` by keyword) and:

    Args:
        logprob_impl: ``fused_token_logprobs`` backend (``"auto"``, ``"torch"``, ``"triton"``, ...).
        model_tokens_only: count only assistant-message tokens of multi-turn conversational continuations;
            needs ``args`` and ``processing_class`` (a tokenizer with a chat template), and builds its own
            collator (:class:`ModelTokenCollator`), so ``data_collator`` must be None or one of those.

    Example::

        args = DPOConfig(output_dir="out", beta=0.1, precompute_ref_log_probs=True)
        trainer = FusedDPOTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                  model_tokens_only=True)
        trainer.train()
    """

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, logprob_impl: str = "auto",
                 model_tokens_only: bool = False, **kwargs):
        self.logprob_impl = logprob_impl
        self.model_tokens_only = model_tokens_only
        if args is not None and args.use_weighting:
            raise NotImplementedError("use_weighting=True (WPO) needs log Σ p² over the vocabulary, which "
                                      "the fused op does not compute; set use_weighting=False or use "
                                      "trl.DPOTrainer")
        if model_tokens_only:
            data_collator = _model_token_collator(data_collator, args, processing_class)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         **kwargs)
        if self.aux_loss_enabled:
            raise NotImplementedError("the MoE router auxiliary loss is not supported by FusedDPOTrainer; "
                                      "set router_aux_loss_coef=0.0 in DPOConfig or use trl.DPOTrainer")
        self._add_fused_heads()

    def _add_fused_heads(self) -> None:
        """Our head on the policy (its base model under PEFT) and the reference model, if any."""
        policy = self.accelerator.unwrap_model(self.model)
        add_fasteto_lm_head(policy.get_base_model() if is_peft_model(policy) else policy, self.logprob_impl)
        if self.ref_model is not None:
            add_fasteto_lm_head(self.accelerator.unwrap_model(self.ref_model), self.logprob_impl)

    def compute_ref_log_probs(self, model, inputs):
        # precompute_ref_log_probs runs inside DPOTrainer.__init__, after TRL added its head: add ours first.
        self._add_fused_heads()
        return super().compute_ref_log_probs(model, inputs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preprocessing; with ``model_tokens_only``, each record's index first (TRL may drop
        records) and its ``MASK_COLUMNS`` after."""
        if not self.model_tokens_only:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        dataset = dataset.map(_record_index, with_indices=True)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return dataset.map(_add_model_masks, fn_kwargs={"tokenizer": processing_class,
                                                        "dataset_name": dataset_name})

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.model_tokens_only and not set(MASK_COLUMNS) <= set(self._signature_columns):
            self._signature_columns = [*self._signature_columns, *MASK_COLUMNS]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's ``log``, without the metrics the fused head does not compute (``NOT_LOGGED``)."""
        for metrics in self._metrics.values():
            for name in NOT_LOGGED:
                metrics.pop(name, None)
        super().log(logs, start_time)


def _model_token_collator(data_collator, args, processing_class) -> ModelTokenCollator:
    """TRL's default collator for ``args``, as a ``ModelTokenCollator`` (built before ``DPOTrainer.__init__``,
    which uses it to precompute reference log-probs)."""
    if isinstance(data_collator, ModelTokenCollator):
        return data_collator
    if data_collator is not None:
        raise ValueError(f"model_tokens_only=True builds its own collator (ModelTokenCollator), but "
                         f"data_collator={type(data_collator).__name__} was passed; pass data_collator=None")
    if args is None or not isinstance(processing_class, PreTrainedTokenizerBase):
        raise ValueError("model_tokens_only=True needs args=DPOConfig(...) and processing_class=<a tokenizer "
                         "with a chat template> (vision processors are not supported)")
    # TRL's own choice of pad token (DPOTrainer.__init__), which it also sets on the tokenizer.
    pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
    return ModelTokenCollator(pad_token_id=processing_class.convert_tokens_to_ids(pad_token),
                              max_length=args.max_length, truncation_mode=args.truncation_mode,
                              pad_to_multiple_of=args.pad_to_multiple_of)
