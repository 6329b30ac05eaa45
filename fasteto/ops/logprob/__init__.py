"""Per-token log-probs from hidden states and the LM head, without materialising ``[tokens × vocab]``."""

from fasteto.ops.logprob.api import IMPLS, fused_token_logprobs

__all__ = ["IMPLS", "fused_token_logprobs"]
