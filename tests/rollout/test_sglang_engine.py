"""SGLangEngine: the HTTP client against a local stand-in server (what is sent and how answers are read),
and the real offline engine where sglang and a GPU exist."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from test_engine import conversations
from tiny import byte_tokenizer, tiny_llama

from fasteto.rollout.engine import GenerationConfig, TransientEngineError, encode_prompt
from fasteto.rollout.sglang_engine import SGLangEngine


class StandIn(BaseHTTPRequestHandler):
    """Answers like an SGLang server started with --skip-tokenizer-init; records every request."""

    requests: list[tuple[str, object]] = []
    reply_ids: list[int] = []
    fail_next: list[int] = []  # HTTP status codes to answer with, first in first out
    update_ok = True

    def do_POST(self):  # noqa: N802 (the http.server API)
        size = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(size)) if size else None
        StandIn.requests.append((self.path, payload))
        if StandIn.fail_next:
            self.send_response(StandIn.fail_next.pop(0))
            self.end_headers()
            self.wfile.write(b"scheduler died")
            return
        if self.path == "/generate":
            body = [{"output_ids": StandIn.reply_ids, "meta_info": {}} for _ in payload["input_ids"]]
        elif self.path == "/update_weights_from_disk":
            body = {"success": StandIn.update_ok, "message": "ok" if StandIn.update_ok else "bad shapes"}
        else:
            body = {}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    StandIn.requests, StandIn.fail_next, StandIn.update_ok = [], [], True
    httpd = HTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_sends_our_token_ids_and_reads_token_ids_back(server):
    tokenizer = byte_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    StandIn.reply_ids = tokenizer("Action: look", add_special_tokens=False)["input_ids"] + [end, 5, 6]
    engine = SGLangEngine.server(server, tokenizer, max_context=4096)
    convs = conversations()
    assert engine.generate(convs, GenerationConfig(max_new_tokens=7)) == ["Action: look"] * 4
    path, payload = StandIn.requests[0]
    assert path == "/generate"
    assert payload["input_ids"] == [encode_prompt(tokenizer, c, 4096, 7) for c in convs]
    assert payload["sampling_params"][0] == {"max_new_tokens": 7, "stop_token_ids": [end],
                                             "temperature": 0.0, "top_p": 1.0}
    engine.generate(convs[:2], GenerationConfig(greedy=False, temperature=0.5, top_p=0.9, seed=10))
    params = StandIn.requests[1][1]["sampling_params"]
    assert [(p["temperature"], p["top_p"], p["sampling_seed"]) for p in params] == [(0.5, 0.9, 10),
                                                                                   (0.5, 0.9, 11)]
    assert engine.generate([], GenerationConfig()) == [] and len(StandIn.requests) == 2


def test_load_policy_updates_weights_then_flushes(server):
    engine = SGLangEngine.server(server, byte_tokenizer())
    engine.load_policy("/runs/x/models/dpo-1")
    assert StandIn.requests == [("/update_weights_from_disk", {"model_path": "/runs/x/models/dpo-1"}),
                                ("/flush_cache", None)]
    StandIn.update_ok = False
    with pytest.raises(RuntimeError, match="could not load the weights at /m: bad shapes"):
        engine.load_policy("/m")


def test_server_failures_are_transient_and_client_errors_are_not(server):
    engine = SGLangEngine.server(server, byte_tokenizer())
    StandIn.fail_next = [503]
    with pytest.raises(TransientEngineError, match="answered 503: scheduler died"):
        engine.generate(conversations()[:1], GenerationConfig())
    StandIn.fail_next = [400]
    with pytest.raises(RuntimeError, match="refused the request \\(400\\)") as raised:
        engine.generate(conversations()[:1], GenerationConfig())
    assert not isinstance(raised.value, TransientEngineError)
    gone = SGLangEngine.server("http://127.0.0.1:9", byte_tokenizer(), timeout_s=5)
    with pytest.raises(TransientEngineError, match="is `python -m sglang.launch_server` running"):
        gone.generate(conversations()[:1], GenerationConfig())


def test_answers_without_token_ids_say_how_to_start_the_server():
    class TextOnly:
        def generate(self, input_ids, sampling_params):
            return [{"text": "hi"} for _ in input_ids]

    with pytest.raises(RuntimeError, match="--skip-tokenizer-init"):
        SGLangEngine(TextOnly(), byte_tokenizer()).generate(conversations()[:1], GenerationConfig())


@pytest.mark.gpu
def test_real_offline_engine_generates_and_reloads_weights(tmp_path):
    pytest.importorskip("sglang", reason="sglang is not installed (pip install 'fasteto[sglang]')")
    if not torch.cuda.is_available():
        pytest.skip("SGLang needs a CUDA device")
    tokenizer = byte_tokenizer()
    for name, seed in (("a", 0), ("b", 7)):
        tiny_llama(len(tokenizer), hidden_size=64, seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    engine = SGLangEngine.offline(str(tmp_path / "a"), tokenizer, mem_fraction_static=0.2)
    try:
        cfg = GenerationConfig(max_new_tokens=8)
        first = engine.generate(conversations(), cfg)
        assert len(first) == 4 and first == engine.generate(conversations(), cfg)
        engine.load_policy(str(tmp_path / "b"))
        assert engine.generate(conversations(), cfg) != first
    finally:
        engine.close()
