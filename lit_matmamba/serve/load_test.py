"""A load test of `main.py serve`: concurrent clients of mixed widths for a while, with malformed
requests among them; latency percentiles and throughput per width, and every failure.

    python -m lit_matmamba.serve.load_test --url http://127.0.0.1:8000 --clients 8 --duration 60
    python -m lit_matmamba.serve.load_test --model exports/lm --clients 8 --duration 60  # starts the server

Client i sends its requests one after another, each at the next width of `--widths` (starting at
the i-th), every other one streamed. Beside them, one more client sends a malformed request every
`--malformed_interval` seconds (in turn: a width the model cannot run, more tokens than the
server allows, an empty prompt, invalid JSON), each of which must get a 4xx. A failure is a valid
request that does not complete with 200, or a malformed one answered otherwise; the command exits
with status 1 if there was any. Requests under way at the end of `--duration` finish; throughput
is counted over the whole time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS = [
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo,",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING HENRY:",
    "To be, or not to be,",
    "HAMLET:\nWhat a piece of work is a man!",
    "Now is the winter of our discontent",
    "All the world's a stage,",
]
MALFORMED = {
    "bad width": lambda: json.dumps({"prompt": "ROMEO:", "width": 3}),
    "too many tokens": lambda: json.dumps({"prompt": "ROMEO:", "max_tokens": 10**6}),
    "empty prompt": lambda: json.dumps({"prompt": "", "max_tokens": 4}),
    "invalid JSON": lambda: '{"prompt": "ROMEO:", "max_tokens": ',
}


@dataclass
class Result:
    kind: str  # the width asked for, or "malformed: <what>"
    ok: bool
    status: int
    seconds: float
    first_token_s: float | None = None  # streamed requests: until the first text arrived
    tokens: int = 0
    error: str = ""


def post(url: str, body: str, stream: bool, timeout: float) -> tuple[int, float | None, int, str]:
    """(HTTP status, seconds to the first text, completion tokens, error) of one request."""
    start = time.perf_counter()
    request = urllib.request.Request(
        url + "/v1/completions", body.encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if not stream:
                data = json.loads(response.read())
                return response.status, None, data["usage"]["completion_tokens"], ""
            first, tokens, done, error = None, 0, False, ""
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if not done and not error:
                error = "the stream ended without [DONE]"
            return response.status, first, tokens, error
    except urllib.error.HTTPError as err:
        return err.code, None, 0, err.read().decode(errors="replace")[:200]
    except (OSError, ValueError, KeyError) as err:
        return 0, None, 0, f"{type(err).__name__}: {err}"


def client(
    i: int,
    url: str,
    widths: list,
    prompts: list[str],
    deadline: float,
    max_tokens: int,
    timeout: float,
    results: list[Result],
) -> None:
    """Client i: one valid request after another until the deadline."""
    n = 0
    while time.perf_counter() < deadline:
        n += 1
        width = widths[(i + n) % len(widths)]
        stream = n % 2 == 0
        body = {
            "prompt": prompts[(i + n) % len(prompts)],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "width": width,
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        start = time.perf_counter()
        status, first, tokens, error = post(url, json.dumps(body), stream, timeout)
        seconds = time.perf_counter() - start
        results.append(Result(str(width), status == 200 and not error, status, seconds, first, tokens, error))


def malformed_client(
    url: str, deadline: float, interval: float, timeout: float, results: list[Result]
) -> None:
    """A malformed request every `interval` seconds, the kinds in turn; each must get a 4xx."""
    kinds = list(MALFORMED)
    n = 0
    while time.perf_counter() < deadline:
        what = kinds[n % len(kinds)]
        n += 1
        start = time.perf_counter()
        status, _, _, error = post(url, MALFORMED[what](), False, timeout)
        seconds = time.perf_counter() - start
        results.append(Result(f"malformed: {what}", 400 <= status < 500, status, seconds, error=error))
        time.sleep(max(0.0, interval - seconds))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def summarize(results: list[Result], seconds: float, widths: list) -> dict[str, Any]:
    rows = {}
    kinds = [str(w) for w in widths] + [f"malformed: {what}" for what in MALFORMED]
    for kind in [k for k in kinds if any(r.kind == k for r in results)]:
        mine = [r for r in results if r.kind == kind]
        done = [r for r in mine if r.ok]
        latencies = [r.seconds for r in done]
        firsts = [r.first_token_s for r in done if r.first_token_s is not None]
        rows[kind] = dict(
            requests=len(mine),
            failed=len(mine) - len(done),
            p50_s=percentile(latencies, 50) if latencies else None,
            p90_s=percentile(latencies, 90) if latencies else None,
            p99_s=percentile(latencies, 99) if latencies else None,
            first_token_p50_s=percentile(firsts, 50) if firsts else None,
            tokens_per_s=sum(r.tokens for r in done) / seconds,
            requests_per_s=len(done) / seconds,
        )
    failures = [r for r in results if not r.ok]
    return dict(
        seconds=seconds,
        requests=len(results),
        failed=len(failures),
        rows=rows,
        failures=[f"{r.kind}: status {r.status} {r.error}" for r in failures[:20]],
    )


def print_summary(summary: dict[str, Any], title: str) -> None:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"\n== {title}")
    print(
        f"{'width':>26s} {'requests':>8s} {'failed':>6s} {'p50 s':>7s} {'p90 s':>7s} {'p99 s':>7s} "
        f"{'1st tok p50 s':>13s} {'tokens/s':>9s} {'req/s':>6s}"
    )
    for kind, r in summary["rows"].items():
        print(
            f"{kind:>26s} {r['requests']:>8d} {r['failed']:>6d} {f(r['p50_s']):>7s} {f(r['p90_s']):>7s} "
            f"{f(r['p99_s']):>7s} {f(r['first_token_p50_s']):>13s} {r['tokens_per_s']:>9.1f} {r['requests_per_s']:>6.2f}"
        )
    print(f"{summary['requests']} requests in {summary['seconds']:.1f} s, {summary['failed']} failed")
    for line in summary["failures"]:
        print("  FAILED", line)


# Starting a server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str], port: int, timeout: float = 300.0, log: Path | None = None
) -> subprocess.Popen:
    """`main.py serve ARGS --port PORT` in a process group of its own, once /health answers 200.
    Stop it with `stop_server`. Raises RuntimeError (with the end of its output) if it exits or is
    not ready in `timeout` seconds."""
    command = [sys.executable, "-c", "from lit_matmamba.cli import main; main()", "serve", *args]
    with open(log or os.devnull, "w") as out:  # the server writes to its own copy of the handle
        proc = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server's process group: SIGTERM (LitServe shuts its workers down), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
    proc.wait()


def load_test(
    url: str | None = None,
    model: str | None = None,
    ckpt_path: str | None = None,
    serve_args: list[str] | None = None,
    clients: int = 8,
    duration: float = 60.0,
    widths: list[str] | None = None,
    prompts: list[str] | None = None,
    max_tokens: int = 32,
    malformed_interval: float = 1.0,
    timeout: float = 120.0,
    out: str | None = None,
) -> dict[str, Any]:
    """Concurrent clients of mixed widths against `main.py serve` for `duration` seconds; prints
    latency percentiles and throughput per width and every failure, exits 1 on any failure.

    Args:
        url: a running server, such as http://127.0.0.1:8000.
        model: or a model directory to start a server for (on a free port, stopped at the end).
        ckpt_path: or a training checkpoint to start a server for.
        serve_args: more arguments for the server started, such as ["--max_batch_size", "8"].
        clients: concurrent clients, each sending one request after another.
        duration: seconds of sending (requests under way then finish).
        widths: the widths requested, in turn ("D", "D/2", an int, ...; default D, D/2, D/4, D/8).
        prompts: the prompts sent, in turn (default: a few lines of Shakespeare).
        max_tokens: new tokens per request (sampled at temperature 0.8, so mostly all of them).
        malformed_interval: seconds between malformed requests (0: none).
        timeout: seconds a request may take.
        out: a JSON file for the results.
    """
    widths = widths or ["D", "D/2", "D/4", "D/8"]
    prompts = prompts or PROMPTS
    proc = None
    if url is None:
        if (model is None) == (ckpt_path is None):
            raise ValueError("give --url of a running server, or --model or --ckpt_path to start one")
        port = free_port()
        source = ["--model", model] if model is not None else ["--ckpt_path", ckpt_path]
        log = Path(out or "load_test").with_suffix(".server.log")
        started = time.perf_counter()
        proc = start_server([*source, *(serve_args or [])], port, log=log)
        print(f"server ready in {time.perf_counter() - started:.1f} s (log: {log})", flush=True)
        url = f"http://127.0.0.1:{port}"
    try:
        results: list[Result] = []
        deadline = time.perf_counter() + duration
        start = time.perf_counter()
        threads = [
            threading.Thread(
                target=client, args=(i, url, widths, prompts, deadline, max_tokens, timeout, results)
            )
            for i in range(clients)
        ]
        if malformed_interval:
            args = (url, deadline, malformed_interval, timeout, results)
            threads.append(threading.Thread(target=malformed_client, args=args))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summary = summarize(results, time.perf_counter() - start, widths)
    finally:
        if proc is not None:
            stop_server(proc)
    summary.update(url=url, clients=clients, duration=duration, max_tokens=max_tokens, widths=widths)
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
    print_summary(
        summary, f"{clients} clients for {duration:g} s against {url}, {max_tokens} new tokens a request"
    )
    if summary["failed"]:
        raise SystemExit(1)
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m lit_matmamba.serve.load_test") -> None:
    from lit_matmamba.deploy.common import run

    run(load_test, sys.argv[1:] if argv is None else argv, prog)


if __name__ == "__main__":
    main()
