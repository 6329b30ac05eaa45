"""A policy engine served by SGLang, for GPU nodes: radix prefix cache, continuous batching, live weights.

Two ways to reach SGLang, one class:

- offline: ``SGLangEngine.offline(model_path, tp_size=..., dp_size=...)`` starts ``sglang.Engine`` in this
  process (its scheduler runs in child processes on the GPUs);
- server: ``SGLangEngine.server(url)`` talks to a running ``python -m sglang.launch_server
  --skip-tokenizer-init ...`` over HTTP.

Prompts go in as token ids made by our own tokenizer and chat template (exactly what the transformers
engines feed the model, truncation included) and replies come back as token ids, so SGLang's tokenizer
never re-tokenises anything. The radix cache finds each episode's previous turn and the shared
instruction by itself. After a training iteration ``load_policy(path)`` loads the new weights into the
running engine (``update_weights_from_disk``) and flushes the prefix cache: no restart.

sglang is an optional extra (``pip install 'fasteto[sglang]'``); this module imports it only when an
offline engine is made.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from fasteto.data.types import Message
from fasteto.rollout.engine import (
    GenerationConfig,
    TransientEngineError,
    decode_reply,
    encode_prompt,
    stop_token_ids,
)

INSTALL_HINT = "install it on a GPU node with `pip install 'fasteto[sglang]'` (see SGLang's install guide)"


class SGLangEngine:
    """A ``PolicyEngine`` over SGLang. Build it with ``offline`` or ``server``; ``backend`` is either an
    ``sglang.Engine`` or an ``_HttpBackend``.

    ``seed``: SGLang samples with a per-request ``sampling_seed``; with ``GenerationConfig.seed`` set,
    request ``i`` of a call gets ``seed + i`` (the server must support it: SGLang ≥ 0.5).
    """

    def __init__(self, backend: Any, tokenizer: Any, max_context: int | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.stops = stop_token_ids(tokenizer)

    @classmethod
    def offline(cls, model_path: str, tokenizer: Any, max_context: int | None = None, tp_size: int = 1,
                dp_size: int = 1, mem_fraction_static: float = 0.5, **engine_args: Any) -> SGLangEngine:
        """Start ``sglang.Engine`` on ``model_path`` (a transformers folder) in this process."""
        try:
            import sglang
        except ImportError as missing:
            raise ImportError(f"the sglang engine needs the sglang package: {INSTALL_HINT}") from missing
        backend = sglang.Engine(model_path=str(model_path), tp_size=tp_size, dp_size=dp_size,
                                skip_tokenizer_init=True, mem_fraction_static=mem_fraction_static,
                                **engine_args)
        return cls(backend, tokenizer, max_context)

    @classmethod
    def server(cls, url: str, tokenizer: Any, max_context: int | None = None,
               timeout_s: float = 600.0) -> SGLangEngine:
        """Use the SGLang server at ``url`` (e.g. ``http://127.0.0.1:30000``)."""
        return cls(_HttpBackend(url, timeout_s), tokenizer, max_context)

    def generate(self, conversations: list[list[Message]], cfg: GenerationConfig) -> list[str]:
        """See ``PolicyEngine.generate``: one batched request for all conversations."""
        if not conversations:
            return []
        prompts = [encode_prompt(self.tokenizer, c, self.max_context, cfg.max_new_tokens)
                   for c in conversations]
        params = [self._sampling_params(cfg, i) for i in range(len(prompts))]
        outputs = self.backend.generate(input_ids=prompts, sampling_params=params)
        if isinstance(outputs, dict):
            outputs = [outputs]
        replies = []
        for i, out in enumerate(outputs):
            if "output_ids" not in out:
                raise RuntimeError(f"SGLang's answer {i} has no 'output_ids' (keys: {sorted(out)}); start "
                                   "the server with --skip-tokenizer-init so that it returns token ids")
            replies.append(decode_reply(self.tokenizer, out["output_ids"], self.stops))
        return replies

    def load_policy(self, model_path: str) -> None:
        """Load the weights saved at ``model_path`` into the running engine and flush its prefix cache
        (the cached KV belongs to the old weights)."""
        result = self.backend.update_weights_from_disk(str(model_path))
        ok, message = _success(result)
        if not ok:
            raise RuntimeError(f"SGLang could not load the weights at {model_path}: {message}")
        self.backend.flush_cache()

    def close(self) -> None:
        shutdown = getattr(self.backend, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _sampling_params(self, cfg: GenerationConfig, index: int) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "stop_token_ids": self.stops,
                                  "temperature": 0.0 if cfg.greedy else cfg.temperature,
                                  "top_p": 1.0 if cfg.greedy else cfg.top_p}
        if not cfg.greedy and cfg.seed is not None:
            params["sampling_seed"] = cfg.seed + index
        return params


def _success(result: Any) -> tuple[bool, str]:
    """SGLang answers weight updates with ``(success, message)`` or ``{"success": ..., "message": ...}``."""
    if isinstance(result, dict):
        return bool(result.get("success")), str(result.get("message", ""))
    if isinstance(result, (tuple, list)) and result:
        return bool(result[0]), str(result[1] if len(result) > 1 else "")
    return bool(result), ""


class _HttpBackend:
    """The few endpoints of an SGLang server that the engine uses, with ``sglang.Engine``'s method names."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def generate(self, input_ids: list[list[int]], sampling_params: list[dict]) -> list[dict]:
        return self._post("/generate", {"input_ids": input_ids, "sampling_params": sampling_params})

    def update_weights_from_disk(self, model_path: str) -> dict:
        return self._post("/update_weights_from_disk", {"model_path": model_path})

    def flush_cache(self) -> Any:
        return self._post("/flush_cache", None)

    def _post(self, path: str, payload: Any) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            if error.code >= 500:  # the server is alive but failed this request: worth another try
                raise TransientEngineError(f"SGLang {path} answered {error.code}: {detail}") from error
            raise RuntimeError(f"SGLang {path} refused the request ({error.code}): {detail}") from error
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise TransientEngineError(f"cannot reach the SGLang server at {self.url}{path}: {error}; is "
                                       "`python -m sglang.launch_server` running there?") from error
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode(errors="replace")
