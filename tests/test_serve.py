"""`main.py serve`: requests, the engine, and the real server process over HTTP, on the CPU.

The HTTP tests start `main.py serve` on a tiny exported model (float64, so that batching rows of
different requests together cannot flip a greedy choice) on a free port, and stop it afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.data.tokenizer import train_bpe_tokenizer
from lit_matmamba.graphs import GraphedDecoder
from lit_matmamba.io import Pretrained, load
from lit_matmamba.serve import CompletionRequest, Engine, RequestError, parse_request

TEXT = (
    "When shall we three meet again, in thunder, lightning, or in rain? When the hurlyburly's done, "
    "when the battle's lost and won. That will be ere the set of sun. Where the place? Upon the heath. "
)
PROMPTS = ["When shall we", "Upon the", "thunder, lightning, or in rain? When the hurly"]
needs_litserve = pytest.mark.skipif(
    importlib.util.find_spec("litserve") is None, reason="needs litserve (the serve extra)"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny language model with a tokenizer, exported: d_model 32, served at 32, 16, 8 and 4."""
    tokenizer = train_bpe_tokenizer([TEXT] * 20, vocab_size=300).to_str()
    torch.manual_seed(0)
    config = MatMambaConfig(d_model=32, n_layer=3, vocab_size=320, d_state=8, headdim=8, chunk_size=8)
    model = MatMambaLM(config)
    pretrained = Pretrained(model, tokenizer_json=tokenizer, eos_token="<|endoftext|>", seq_len=64)
    return pretrained.save(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def reference(exported):
    """width, prompt, max_tokens -> what `generate` continues greedily, as text."""
    pretrained = load(exported)
    model, tokenizer, eos = pretrained.model.double(), pretrained.tokenizer(), pretrained.eos_token_id()

    def expected(width, prompt: str, max_tokens: int) -> str:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        out = model.generate([torch.tensor(ids)], max_tokens, width, temperature=0, eos_token_id=eos)[0]
        new = out[len(ids) :].tolist()
        return tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)

    return expected


def run_engine(engine: Engine, requests: dict) -> dict:
    """Submit every request, then step until done: uid -> (text, last message)."""
    for uid, request in requests.items():
        engine.submit(uid, request)
    text, last = {uid: "" for uid in requests}, {}
    while engine.busy:
        for uid, message in engine.step():
            text[uid] += message["text"]
            last[uid] = message
    assert set(last) == set(requests) and all(m["finish_reason"] for m in last.values())
    return {uid: (text[uid], last[uid]) for uid in requests}


# Requests ---------------------------------------------------------------------------------------
def test_requests_are_read_with_openai_defaults():
    req = parse_request({"prompt": "hi", "width": "D/4"}, 64)
    assert req == CompletionRequest(prompt="hi", max_tokens=16, temperature=1.0, width="D/4")
    req = parse_request(
        {
            "prompt": ["hi"],
            "max_tokens": 8,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "latency_ms_per_token": 2.5,
            "n": 1,
            "user": "me",
        },
        64,
    )
    settings = (req.max_tokens, req.temperature, req.top_p, req.top_k, req.stream, req.include_usage)
    assert settings == (8, 0.0, 0.5, 3, True, True) and req.latency_ms_per_token == 2.5
    assert parse_request({"prompt": "a", "width": [8, 4]}, 9).width == (8, 4)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ([1, 2], None, "JSON object"),
        ({"max_tokens": 3}, "prompt", "prompt must be a string"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "a", "max_tokens": 65}, "max_tokens", "more than this server generates"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": "a", "width": "wide"}, "width", "width must be"),
        ({"prompt": "a", "width": "frontier.json"}, "width", "width must be"),  # no files from requests
        ({"prompt": "a", "width": 8, "latency_ms_per_token": 3}, "width", "not both"),
        ({"prompt": "a", "latency_ms_per_token": 0}, "latency_ms_per_token", "must lie in"),
        ({"prompt": "a", "temperature": -1}, "temperature", "must lie in"),
        ({"prompt": "a", "top_p": 0}, "top_p", "must lie in"),
        ({"prompt": "a", "n": 2}, "n", "not supported"),
        ({"prompt": "a", "stop": ["\n"]}, "stop", "not supported"),
        ({"prompt": "a", "wdith": 8}, "wdith", "unknown field"),
        ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(body, param, words):
    with pytest.raises(RequestError, match=words) as err:
        parse_request(body, 64)
    assert err.value.param == param and err.value.status == 400
    assert err.value.body()["error"]["type"] == "invalid_request_error"


# The engine -------------------------------------------------------------------------------------
def test_engine_decodes_what_generate_decodes_at_every_width(exported, reference):
    """Three prompts at each of four widths at once, two slots a width (so requests wait, and
    rows finishing at different steps refill their slots), sampled requests among them."""
    engine = Engine(load(exported), max_batch_size=2, dtype=torch.float64)
    assert list(engine.timings()) == ["32 (D)", "16 (D/2)", "8 (D/4)", "4 (D/8)"]
    requests = {}
    for w in (32, 16, 8, 4):
        for i, prompt in enumerate(PROMPTS):
            requests[(w, i)] = CompletionRequest(prompt, max_tokens=6 + 3 * i, temperature=0, width=w)
        requests[(w, "sampled")] = CompletionRequest("When", max_tokens=5, temperature=1.0, top_k=5, width=w)
    done = run_engine(engine, requests)
    for (w, i), (text, last) in done.items():
        assert last["width"] == w
        if i != "sampled":
            assert text == reference(w, PROMPTS[i], 6 + 3 * i), (w, i)
            assert last["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[i]).ids)
    assert not engine.busy


def test_engine_picks_and_refuses_widths(exported, reference):
    engine = Engine(load(exported), widths=["D", "D/4"], max_batch_size=2, dtype=torch.float64)
    times = engine.timings()
    assert list(times) == ["32 (D)", "8 (D/4)"] and all(t > 0 for t in times.values())
    with pytest.raises(RequestError, match="not served here; served widths: 32 \\(D\\), 8 \\(D/4\\)"):
        engine.submit(0, CompletionRequest("When", width=16))
    with pytest.raises(RequestError, match="not valid for layer 0"):
        engine.submit(0, CompletionRequest("When", width=6))
    with pytest.raises(RequestError, match="no served width decodes within"):
        engine.submit(0, CompletionRequest("When", latency_ms_per_token=1e-6))
    with pytest.raises(RequestError, match="longest context"):
        engine.submit(0, CompletionRequest("thunder " * 80))
    generous = 1e6  # every width fits: the widest is taken
    done = run_engine(
        engine,
        {
            1: CompletionRequest("When", 4, 0.0, latency_ms_per_token=generous),
            2: CompletionRequest("When", 4, 0.0),
        },
    )
    assert done[1][1]["width"] == 32 == done[2][1]["width"]  # the default is the widest too
    assert done[1][0] == reference(32, "When", 4)


def test_engine_refuses_what_it_cannot_serve(exported, tmp_path):
    with pytest.raises(ValueError, match="not valid"):
        Engine(load(exported), widths=[6])
    bare = Pretrained(load(exported).model).save(tmp_path / "bare")  # no tokenizer
    with pytest.raises(ValueError, match="records no tokenizer"):
        Engine(load(bare))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_on_the_gpu_decodes_what_generate_decodes(exported, dtype):
    """The engine's CUDA graphs (one slot a width, so every step has generate's shapes) against
    `generate` without graphs on a state of the engine's dtype, greedy: the same text in float32;
    in bfloat16 (how the GPU serves by default) a complete answer of every width (a free-running
    greedy text in bf16 may part at a near tie; tests/test_decoder.py compares bf16 steps)."""
    engine = Engine(load(exported, map_location="cuda"), max_batch_size=1, dtype=dtype)
    assert engine.cuda_graphs
    requests = {
        (w, i): CompletionRequest(p, 12, 0.0, width=w) for w in (32, 16, 8, 4) for i, p in enumerate(PROMPTS)
    }
    done = run_engine(engine, requests)
    model, tokenizer, eos = engine.model, engine.tokenizer, engine.eos
    ssm_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
    for (w, i), (text, last) in done.items():
        assert last["width"] == w and last["usage"]["completion_tokens"] <= 12
        if dtype == torch.bfloat16:
            continue
        ids = tokenizer.encode(PROMPTS[i], add_special_tokens=False).ids
        decoder = GraphedDecoder(model, w, 1, ssm_dtype=ssm_dtype, cuda_graphs=False)
        out = model.generate([torch.tensor(ids)], 12, w, temperature=0, eos_token_id=eos, decoder=decoder)[0]
        new = [t for t in out[len(ids) :].tolist() if t != eos]
        assert text == tokenizer.decode(new, skip_special_tokens=True), (w, i)


# The server process -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    from lit_matmamba.serve.load_test import free_port, start_server, stop_server

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(exported), "--device", "cpu", "--dtype", "float64", "--max_batch_size", "4"]
    proc = start_server([*args, "--max_tokens", "32"], port, timeout=240, log=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


def post(url: str, body) -> tuple[int, dict | str]:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read().decode()
            return response.status, json.loads(raw) if not raw.startswith("data:") else raw
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@needs_litserve
def test_server_completion_equals_generate_at_every_width(server, reference):
    for width, asked in ((32, "D"), (16, 16), (8, "D/4"), (4, [4, 4, 4])):
        status, body = post(
            server, {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "width": asked}
        )
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(width, PROMPTS[0], 10) and body["width"] == width
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 10


@needs_litserve
def test_server_streams(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 9, "temperature": 0, "width": "D/2"}
    status, whole = post(server, body)
    status, events = post(server, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    lines = [line[6:] for line in events.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []


MALFORMED = [
    ('{"prompt": "When", "max_tokens": ', "not valid JSON"),
    ({"prompt": "When", "width": 6}, "not valid for layer"),
    ({"prompt": "When", "width": "D/16"}, "not valid for layer"),
    ({"prompt": "When", "max_tokens": 1000}, "more than this server generates"),
    ({"prompt": ""}, "empty"),
    ({"prompt": "thunder " * 80}, "longest context"),
    ({"prompt": "When", "latency_ms_per_token": 1e-6}, "no served width"),
    ({"prompt": "When", "echo": True}, "not supported"),
]


@needs_litserve
def test_server_answers_malformed_requests_with_4xx_and_keeps_serving(server, reference):
    for body, words in MALFORMED:
        status, answer = post(server, body)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
    status, answer = post(server, {"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "width": 8})
    assert status == 200 and answer["choices"][0]["text"] == reference(8, PROMPTS[2], 5)


@needs_litserve
def test_server_concurrent_mixed_widths_all_succeed(server, reference):
    """24 requests at once, four widths, with malformed ones among them: each valid one gets what
    `generate` gives alone, each malformed one its 400."""
    jobs = [(w, PROMPTS[i % 3], 4 + i % 5) for i, w in enumerate([32, 16, 8, 4] * 5)]
    answers: dict[int, tuple] = {}

    def send(k: int) -> None:
        if k >= len(jobs):
            answers[k] = post(server, MALFORMED[k % len(MALFORMED)][0])
            return
        w, prompt, n = jobs[k]
        answers[k] = post(
            server, {"prompt": prompt, "max_tokens": n, "temperature": 0, "width": w, "stream": k % 2 == 0}
        )

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(jobs) + 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, (w, prompt, n) in enumerate(jobs):
        status, body = answers[k]
        assert status == 200, body
        if isinstance(body, str):  # streamed
            chunks = [json.loads(x[6:]) for x in body.split("\n\n") if x.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            text = body["choices"][0]["text"]
        assert text == reference(w, prompt, n), (k, w)
    assert all(answers[k][0] == 400 for k in range(len(jobs), len(jobs) + 4))


@needs_litserve
def test_load_test_command(server, tmp_path, capsys):
    from lit_matmamba.serve.load_test import main

    out = tmp_path / "load.json"
    args = ["--clients", "3", "--duration", "3", "--max_tokens", "4", "--malformed_interval", "0.5"]
    main(["--url", server, *args, "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and summary["requests"] > 3
    assert {"D", "D/2", "D/4", "D/8"} <= set(summary["rows"]) and "p99" in capsys.readouterr().out
    assert sum(r["requests"] for k, r in summary["rows"].items() if k.startswith("malformed")) >= 4


def test_serve_explains_itself(capsys):
    from lit_matmamba.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert all(
        f in out
        for f in ["--ckpt_path", "--model", "--widths", "--port", "--max_batch_size", "latency_ms_per_token"]
    )
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "    serve  " in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["serve", "--model", "/nonexistent/model"])
    assert "not found" in str(done.value.code)
