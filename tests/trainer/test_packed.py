"""The fast trainer's correctness gate: packed shared-prefix trees + tree attention + fused log-probs must
compute what the plain padded path computes.

On ETO-shaped pairs (an instruction shared by every prompt, chosen and rejected with a common first turn,
a chosen that is a prefix of its rejected, one chosen with three rejected, observation tokens masked out
inside continuations) and tiny fp32 Llama / Qwen2 / Mistral models (plus a tied and a biased LM head), the
fast path follows FlashAttention's tolerance rule against an fp64 oracle (the padded path on a float64
copy of the model): its error is at most 2× the plain fp32 path's (3× for gradients) plus a floor, for
the per-sequence log-probs and for every parameter's gradient under each loss's upstream gradient; each
loss (sigmoid, ipo, sigmoid_norm, hinge) stays within what the log-prob rule allows, and each loss's
end-to-end gradients match. Whole ``train_dpo`` / ``train_sft`` runs with trainer="fast" and "plain"
give the same step losses and weights; LoRA, activation checkpointing and bf16 autocast are covered too.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from tiny import tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fasteto.data.tokenized import TokenizedPair, TokenizedSequence
from fasteto.models.packed import packed_sequence_logps
from fasteto.packing import pack_pairs, plan_micro_batches
from fasteto.trainer import (
    PREFERENCE_LOSSES,
    TrainConfig,
    apply_lora,
    preference_loss,
    reference_logps,
    reference_logps_packed,
    sequence_logps,
    train_dpo,
    train_sft,
)
from fasteto.trainer.batching import pad_pairs

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny matrices: one thread is ~30x faster on a shared CPU
    # CPU runs FlexAttention eagerly on purpose (see fasteto/ops/tree_attention/flex.py)
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    # peft 0.21 still calls transformers' deprecated name
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
FAMILIES = ("llama", "qwen2", "mistral")
BETA = 0.3


def tiny_model(family: str, seed: int = 0, variant: str = "") -> torch.nn.Module:
    """2 layers, GQA (4 heads over 2 KV heads), random init, fp32, eval mode. Qwen2 has q/k/v biases.
    ``variant``: "tied" (LM head = input embedding) or "head-bias" (an LM head with a bias)."""
    if family == "llama":
        model = tiny_llama(vocab_size=VOCAB, seed=seed, tie=variant == "tied")
    else:
        torch.manual_seed(seed)
        config_cls, model_cls = ((Qwen2Config, Qwen2ForCausalLM) if family == "qwen2"
                                 else (MistralConfig, MistralForCausalLM))
        model = model_cls(config_cls(**SMALL, tie_word_embeddings=variant == "tied")).eval()
    if variant == "head-bias":
        model.lm_head = torch.nn.Linear(SMALL["hidden_size"], VOCAB, bias=True)
    return model


def eto_pairs(seed: int = 0) -> list[TokenizedPair]:
    """ETO-shaped pairs. Continuations alternate model turns (mask True) and observations (False)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    def turns(n: int) -> tuple[list[int], list[bool]]:
        out_ids, out_mask = [], []
        for k in range(n):
            model_turn = k % 2 == 0
            length = int(torch.randint(2, 5, (1,), generator=g))
            out_ids += ids(length)
            out_mask += [model_turn] * length
        return out_ids, out_mask

    instruction = ids(7)  # the environment's instruction exchange opens every prompt

    def prompt() -> list[int]:
        return instruction + ids(3)

    pairs = []
    first, first_mask = turns(2)  # chosen and rejected share their first action and observation
    (c, cm), (r, rm) = turns(3), turns(4)
    pairs.append(TokenizedPair("common-first-turn", prompt(), first + c, first_mask + cm, first + r,
                               first_mask + rm))
    (c, cm), (extra, em) = turns(3), turns(2)  # the explorer went on where the expert stopped
    pairs.append(TokenizedPair("chosen-is-prefix", prompt(), c, cm, c + extra, cm + em))
    p, (c, cm) = prompt(), turns(3)  # one expert trajectory against three failed ones
    for k in range(3):
        r, rm = turns(3 + k % 2)
        pairs.append(TokenizedPair(f"three-rejected-{k}", p, c, cm, r, rm))
    return pairs


def rounding_floor(oracle: torch.Tensor) -> float:
    """Twice fp32's rounding error at the oracle's magnitude (at least one fp32 epsilon of its max)."""
    oracle = oracle.double()
    return max(2 * (oracle.float().double() - oracle).abs().max().item(),
               torch.finfo(torch.float32).eps * oracle.abs().max().item())


def max_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.double() - oracle.double()).abs().max().item()


def assert_rule(fast: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor, factor: float = 2.0,
                what: str = "output", terms: int = 1) -> None:
    """FlashAttention's rule: ``|fast - oracle| <= factor * |plain - oracle| + floor`` (max norms).

    ``terms``: how many terms each entry sums (tokens, for a weight gradient). FlashAttention's floor is
    for bf16, where rounding the result dominates; in fp32 the order of a sum of n terms dominates, and
    the fast path sums in another order (a shared prefix's gradient is one row, not several), so the
    floor is also fp32's random-walk error of such a sum, ``eps * sqrt(n) * max|oracle|``."""
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    err_fast, err_plain = max_error(fast, oracle), max_error(plain, oracle)
    floor = max(rounding_floor(oracle),
                torch.finfo(torch.float32).eps * terms**0.5 * oracle.abs().max().item())
    assert err_fast <= factor * err_plain + floor, (
        f"{what}: fast error {err_fast:.3g} > {factor} x plain error {err_plain:.3g} + floor {floor:.3g}")


def assert_loss_within_logp_bound(fast: torch.Tensor, oracle: torch.Tensor, d_loss_d_logps: torch.Tensor,
                                  logp_bound: float, what: str) -> None:
    """A scalar loss is a sum over pairs, where the plain path's errors may cancel by luck, so the rule
    on the loss itself would be flaky; instead the loss error must stay within what the log-prob rule
    allows: ``|fast - oracle| <= sum_q |dL/dlogp_q| * logp_bound + floor``, with ``logp_bound`` = the
    rule's bound on each log-prob error (2x plain's + floor)."""
    assert torch.isfinite(fast).all(), f"{what}: non-finite value"
    bound = d_loss_d_logps.abs().sum().item() * logp_bound + rounding_floor(oracle)
    error = max_error(fast, oracle)
    assert error <= bound, f"{what}: error {error:.3g} > bound {bound:.3g}"


def oracle_logps(model64: torch.nn.Module, pairs: list[TokenizedPair]) -> torch.Tensor:
    """The padded path in float64 throughout (logits and log-softmax): ``[2B]``, chosen rows first."""
    batch = pad_pairs(pairs, pad_id=0)
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["loss_mask"][:, 1:]).sum(-1)


def fast_logps(model, pairs, attn_impl: str, logprob_impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path, reordered like ``pad_pairs``: ``[2B]`` sums and counts, chosen first."""
    batch, chosen, rejected = pack_pairs(pairs)
    sums, counts = packed_sequence_logps(model, batch, attn_impl=attn_impl, logprob_impl=logprob_impl)
    order = torch.cat([chosen, rejected])
    return sums[order], counts[order]


def losses(logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every preference loss of ``[2B]`` policy log-probs against ``[2B]`` reference ones."""
    b = logps.numel() // 2
    return {name: preference_loss(name, logps[:b], logps[b:], ref[:b], ref[b:], BETA, counts[:b],
                                  counts[b:])[0] for name in PREFERENCE_LOSSES}


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads, strict=True)}


@functools.cache
def baseline(family: str, variant: str = "") -> dict[str, dict]:
    """Per family: ``ref``, reference log-probs ``[2B]`` (the oracle's plus fixed noise, so that the
    log-ratios are not zero); ``upstream``: each loss's ``dL/dlogp`` ``[2B]`` at the oracle's log-probs;
    ``plain`` and ``oracle``: log-probs, counts, every loss and the gradients of ``sum(upstream * logps)``
    (``backward``), of the padded path in fp32 and of the float64 oracle; the oracle's also every
    gradient of every loss (``grads``)."""
    pairs = eto_pairs()
    model = tiny_model(family, variant=variant)
    batch = pad_pairs(pairs, pad_id=0)
    plain_logps, counts = sequence_logps(model, batch["input_ids"], batch["loss_mask"],
                                         batch["attention_mask"])
    model64 = copy.deepcopy(model).double()
    oracle_lp = oracle_logps(model64, pairs)
    noise = torch.randn(oracle_lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = (oracle_lp.detach() + noise).float()
    at = oracle_lp.detach().requires_grad_()
    upstream = {k: torch.autograd.grad(v, at)[0] for k, v in losses(at, counts, ref).items()}
    out: dict[str, dict] = {"ref": {"logps": ref}, "upstream": upstream}
    for name, m, logps in (("plain", model, plain_logps), ("oracle", model64, oracle_lp)):
        values = losses(logps, counts, ref)
        backward = {k: gradients(m, (g.to(logps.dtype) * logps).sum()) for k, g in upstream.items()}
        out[name] = {"logps": logps.detach(), "counts": counts, "values": values, "backward": backward}
    out["oracle"]["grads"] = {k: gradients(model64, v) for k, v in out["oracle"]["values"].items()}
    return out


CASES = [(family, "", attn, logprob) for family in FAMILIES for attn in ("reference", "varlen_eager")
         for logprob in ("torch", "reference")]
CASES += [("llama", "tied", "varlen_eager", "torch"), ("qwen2", "head-bias", "varlen_eager", "torch")]


@pytest.mark.parametrize(("family", "variant", "attn_impl", "logprob_impl"), CASES)
def test_fast_logps_losses_and_every_gradient_match_plain(family: str, variant: str, attn_impl: str,
                                                          logprob_impl: str):
    """Forward: per-sequence log-probs by the rule; each loss within the bound the log-prob rule allows.
    Backward: the gradient of every parameter by the 3x rule, for each loss's upstream gradient
    ``dL/dlogp`` (taken from the oracle, so the comparison isolates the backward pass; the forward's part
    is the log-prob check). The gradients of the losses as the fast path computes them end to end (its
    own log-probs giving ``dL/dlogp``) match the oracle's to 1e-4 of each tensor's largest entry."""
    base = baseline(family, variant)
    plain, oracle = base["plain"], base["oracle"]
    model = tiny_model(family, variant=variant)
    pairs = eto_pairs()
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    logps, counts = fast_logps(model, pairs, attn_impl, logprob_impl)
    assert torch.equal(counts, plain["counts"])
    assert_rule(logps, plain["logps"], oracle["logps"], what="per-sequence log-probs")
    logp_bound = 2 * max_error(plain["logps"], oracle["logps"]) + rounding_floor(oracle["logps"])
    for name, loss in losses(logps, counts, base["ref"]["logps"]).items():
        upstream = base["upstream"][name]
        assert_loss_within_logp_bound(loss, oracle["values"][name], upstream, logp_bound, what=f"{name} loss")
        backward = gradients(model, (upstream.float() * logps).sum())
        for param, grad in backward.items():
            assert_rule(grad, plain["backward"][name][param], oracle["backward"][name][param], factor=3.0,
                        what=f"{name} backward, grad of {param}", terms=tokens)
        for param, grad in gradients(model, loss).items():
            expected = oracle["grads"][name][param]
            scale = expected.abs().max().item()
            torch.testing.assert_close(grad.double(), expected, rtol=0, atol=1e-4 * scale + 1e-12,
                                       msg=f"{name} loss, grad of {param}")


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_forward_matches_plain(family: str) -> None:
    # FlexAttention has no backward on CPU: the forward alone, as the reference pass runs it
    base = baseline(family)
    with torch.no_grad():
        logps, _ = fast_logps(tiny_model(family), eto_pairs(), "flex", "torch")
    assert_rule(logps, base["plain"]["logps"], base["oracle"]["logps"], what="flex log-probs")


def test_reference_pass_packed_matches_plain() -> None:
    base, pairs = baseline("qwen2"), eto_pairs()
    assert len(plan_micro_batches(pairs, 40)) > 1  # several packed micro-batches
    model = tiny_model("qwen2").train()
    packed = reference_logps_packed(model, pairs, token_budget=40, attn_impl="varlen_eager")
    plain = reference_logps(model, pairs, pad_id=0, micro_batch_size=2)
    assert model.training  # restored
    assert sorted(packed) == sorted(plain) == list(range(len(pairs)))

    def flat(ref: dict[int, tuple[float, float]]) -> torch.Tensor:
        return torch.tensor([ref[i][0] for i in range(len(pairs))] + [ref[i][1] for i in range(len(pairs))],
                            dtype=torch.float64)

    assert_rule(flat(packed), flat(plain), base["oracle"]["logps"], what="reference log-probs")


# ---------------------------------------------------------------- whole training runs, fast vs plain


def sft_sequences(pairs: list[TokenizedPair]) -> list[TokenizedSequence]:
    """SFT data of the same shape: every pair's chosen and rejected as a conversation (the instruction is
    shared by all, the three-rejected pairs' chosen appear three times)."""
    out = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids, mask = getattr(p, f"{side}_ids"), getattr(p, f"{side}_mask")
            prompt_mask = [False] * len(p.prompt_ids)
            out.append(TokenizedSequence(f"{p.id}/{side}", p.prompt_ids + ids, prompt_mask + mask))
    return out


def run_both(kind: str, make_model, **overrides) -> dict[str, tuple[list[dict], torch.nn.Module]]:
    """The same run with trainer="plain" (micro-batches of 1) and "fast" (a budget that makes several
    packed micro-batches per step)."""
    pairs = eto_pairs()
    ref = reference_logps(tiny_model("llama", seed=5), pairs, pad_id=0, micro_batch_size=5)
    out = {}
    for trainer in ("plain", "fast"):
        model = make_model()
        cfg = TrainConfig(lr=1e-3, epochs=2, global_batch=3, micro_batch=1, schedule="constant",
                          warmup_ratio=0.0, beta=BETA, trainer=trainer, token_budget=48,
                          attn_impl="varlen_eager", **overrides)  # fmt: skip
        if kind == "dpo":
            history = train_dpo(model, pairs, ref, cfg)
        else:
            history = train_sft(model, sft_sequences(pairs), cfg)
        out[trainer] = (history, model)
    return out


def assert_same_run(runs: dict[str, tuple[list[dict], torch.nn.Module]], weight_atol: float = 1e-5) -> None:
    (plain, plain_model), (fast, fast_model) = runs["plain"], runs["fast"]
    assert [h["step"] for h in fast] == [h["step"] for h in plain] and len(plain) >= 3
    for p, f in zip(plain, fast, strict=True):
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-5, abs=1e-6), (p["step"], p["loss"], f["loss"])
        assert f["tokens_plain"] == p["tokens_plain"] == p["tokens"] >= f["tokens"]
        for key in ("rewards/margin", "rewards/accuracy", "logps/chosen", "model_tokens"):
            if key in p:
                assert f[key] == pytest.approx(p[key], rel=1e-4, abs=1e-5), key
    assert sum(h["tokens"] for h in fast) < sum(h["tokens"] for h in plain)  # shared prefixes ran once
    # AdamW moves a weight by ≈ lr·g/(|g| + 1e-8): where |g| is tiny, rounding-level differences in g
    # move it by up to ~lr/100 differently, and later steps carry that on
    fast_params = dict(fast_model.named_parameters())
    for name, p in plain_model.named_parameters():
        torch.testing.assert_close(fast_params[name], p, rtol=0, atol=weight_atol, msg=name)


@pytest.mark.parametrize("loss", PREFERENCE_LOSSES)
def test_train_dpo_fast_equals_plain(loss: str) -> None:
    assert_same_run(run_both("dpo", lambda: tiny_model("qwen2"), loss=loss))


def test_train_dpo_with_a_chosen_nll_term_fast_equals_plain() -> None:
    runs = run_both("dpo", lambda: tiny_model("qwen2"), sft_weight=0.5)
    assert_same_run(runs)
    assert all(h["nll/chosen"] > 0 for h in runs["plain"][0])


def test_train_sft_fast_equals_plain() -> None:
    assert_same_run(run_both("sft", lambda: tiny_model("mistral")))


def lora_model() -> torch.nn.Module:
    model = apply_lora(tiny_model("llama"), rank=4, alpha=8.0)
    with torch.no_grad():  # peft starts B at 0; a random B makes every adapter weight's gradient non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_lora_fast_equals_plain_and_trains_only_the_adapter() -> None:
    base = {k: v.detach().clone() for k, v in tiny_model("llama").named_parameters()}
    runs = run_both("dpo", lora_model)
    assert_same_run(runs)
    for model in (runs["plain"][1], runs["fast"][1]):
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained)
        weights = model.get_base_model().state_dict()
        for name, value in base.items():  # the base weights did not move
            key = name if name in weights else name.replace(".weight", ".base_layer.weight")
            assert torch.equal(weights[key], value), name


@pytest.mark.parametrize("trainer", ["fast", "plain"])
def test_gradient_checkpointing_gives_the_same_gradients(trainer: str) -> None:
    pairs = eto_pairs()
    ref = reference_logps(tiny_model("llama", seed=5), pairs, pad_id=0, micro_batch_size=5)
    results = []
    for checkpointing in (False, True):
        model = tiny_model("llama").train()
        layer_calls: list[int] = []
        # a pre-hook: checkpoint's recompute stops early (inside the MLP) once it has what backward needs
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *args, calls=layer_calls: calls.append(1))
        cfg = TrainConfig(lr=1e-3, epochs=1, global_batch=5, micro_batch=5, trainer=trainer, token_budget=48,
                          attn_impl="varlen_eager", gradient_checkpointing=checkpointing)  # fmt: skip
        history = train_dpo(model, pairs, ref, cfg)
        forwards = len(plan_micro_batches(pairs, 48)) if trainer == "fast" else 1
        assert len(layer_calls) == forwards * (2 if checkpointing else 1)  # recomputed in backward
        assert not model.is_activation_checkpointing  # switched off again after the run
        results.append((history[0]["loss"], {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-9, msg=name)


def test_bf16_autocast_runs_close_to_plain() -> None:
    base, pairs = baseline("llama"), eto_pairs()
    model = tiny_model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = fast_logps(model, pairs, "varlen_eager", "torch")
        batch = pad_pairs(pairs, pad_id=0)
        plain, _ = sequence_logps(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
    assert fast.dtype == plain.dtype == torch.float32
    # loose: bf16 rounds differently along the two paths; 3x plain bf16's error from the fp64 oracle
    assert_rule(fast, plain, base["oracle"]["logps"], factor=3.0, what="bf16 log-probs")
    runs = run_both("dpo", lambda: tiny_model("llama"), bf16=True)
    (plain_h, _), (fast_h, _) = runs["plain"], runs["fast"]
    for p, f in zip(plain_h, fast_h, strict=True):
        assert math.isfinite(f["loss"]) and f["loss"] == pytest.approx(p["loss"], rel=2e-2)
