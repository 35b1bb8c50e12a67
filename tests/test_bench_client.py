"""The load generator's HTTP client (benchmarks/serve.py): its response parser fed byte by byte, and whole runs
against a live exaserve on the tiny checkpoint."""
import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import orjson
import pytest

# benchmarks/ is a folder of scripts, not a package: load the script by its path
_spec = importlib.util.spec_from_file_location("bench_serve",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py")
serve = sys.modules["bench_serve"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

pytest_plugins = ["server_fixture"]

EVENTS = [{"choices": [{"index": 0, "text": t}]} for t in ("Hel", "lo", "", " wor\u00e9ld")] + [
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}]


def sse_body(events) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunked(body: bytes, sizes) -> bytes:
    out, pos, i = b"", 0, 0
    while pos < len(body):
        piece = body[pos:pos + sizes[i % len(sizes)]]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        pos, i = pos + len(piece), i + 1
    return out + b"0\r\n\r\n"


class FakeTransport:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def feed(response: bytes, piece: int, close_at_end: bool = False):
    """Parse `response` delivered in pieces of `piece` bytes; returns (data payloads, stream, transport)."""
    async def run():
        got = []
        stream = serve._Stream(lambda data, t: got.append(data))
        transport = FakeTransport()
        stream.connection_made(transport)
        for i in range(0, len(response), piece):
            stream.data_received(response[i:i + piece])
        if close_at_end:
            stream.eof_received()
            stream.connection_lost(None)
        assert stream.done.done(), "the response end was not recognised"
        stream.done.result()
        return got, stream, transport
    return asyncio.run(run())


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 10_000])
@pytest.mark.parametrize("sizes", [[5], [1, 13, 2], [10_000]])
def test_chunked_sse_in_any_split(piece, sizes):
    body = sse_body(EVENTS)
    got, stream, transport = feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes), piece)
    assert [orjson.loads(g) for g in got[:-1]] == EVENTS and got[-1] == b"[DONE]"
    assert stream.status == 200 and transport.closed


@pytest.mark.parametrize("piece", [1, 9, 10_000])
def test_content_length_and_read_to_close_bodies(piece):
    body = sse_body(EVENTS[:2]).replace(b"\n", b"\r\n")  # CRLF line ends are SSE too
    got, _, _ = feed(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body, piece)
    assert [orjson.loads(g) for g in got[:-1]] == EVENTS[:2]
    got, _, _ = feed(HEAD + b"\r\n" + body, piece, close_at_end=True)
    assert got[-1] == b"[DONE]" and len(got) == 3


def test_error_status_keeps_the_body():
    body = b'{"error": {"message": "bad", "type": "invalid_request_error"}}'
    _, stream, _ = feed(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(body) + body, 5)
    assert stream.status == 400 and bytes(stream.body) == body


def test_garbage_and_truncation_are_errors():
    async def run(response: bytes):
        stream = serve._Stream(lambda data, t: None)
        stream.connection_made(FakeTransport())
        stream.data_received(response)
        stream.connection_lost(None)
        with pytest.raises((ValueError, ConnectionError)):
            stream.done.result()
    asyncio.run(run(b"SSH-2.0-OpenSSH\r\n\r\n"))
    asyncio.run(run(HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\ndata:"))  # closed mid-stream


@pytest.fixture(scope="module")
def server(tiny_model, live_server):
    with live_server(tiny_model, "--dtype", "float32", "--served-model-name", "tiny", "--api-key", "k1") as live:
        yield live


def test_results_go_to_the_bench_cache_by_default(server, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    code = serve.main(["--base-url", server.url, "--api-key", "k1", "--tokenizer", str(tiny_model), "--input-len",
                       "4", "--output-len", "2", "--num-prompts", "2", "--label", "x"])
    assert code == 0
    (written,) = (tmp_path / "results").glob("x-random-*.json")
    assert json.loads(written.read_text())["runs"][0]["completed"] == 2
    assert f"results: {written}" in capsys.readouterr().out


def test_help_names_no_empty_defaults(capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "default: None" not in text and "the server under test (default: http://127.0.0.1:8000)" in " ".join(
        text.split())


@pytest.mark.parametrize("dataset", ["random", "chat"])
def test_runs_against_a_live_server(server, tiny_model, tmp_path, dataset):
    out = tmp_path / "r.json"
    code = serve.main(["--base-url", server.url + "/", "--api-key", "k1", "--tokenizer", str(tiny_model),
                       "--dataset", dataset, "--input-len", "12", "--output-len", "6:9", "--num-prompts", "5",
                       "--sweep-concurrency", "1,3", "--result-file", str(out), "--plot-file",
                       str(tmp_path / "p.png")])
    assert code == 0
    doc = json.loads(out.read_text())
    for run in doc["runs"]:
        assert run["completed"] == 5 and run["failed"] == 0
        assert 5 * 6 <= run["output_tokens"] <= 5 * 9 and run["output_tokens_from_usage"] == 5
        assert run["ttft_ms"]["median"] > 0 and run["e2el_ms"]["median"] >= run["ttft_ms"]["median"]
    assert "api_key" not in doc["meta"]
    try:
        import matplotlib  # noqa: F401  (optional: without it the run still succeeds, with no plot)
        assert (tmp_path / "p.png").stat().st_size > 0
    except ImportError:
        assert not (tmp_path / "p.png").exists()


def test_schema_runs_send_the_template_kwargs(server, tiny_model, tmp_path, monkeypatch):
    """--json-schema with --chat-template-kwargs: every chat request carries both (thinking off, so a reasoning
    template's grammar starts at the first token), and the constrained run completes."""
    bodies, send = [], serve.send
    monkeypatch.setattr(serve, "send", lambda target, endpoint, body, prompt: bodies.append(body) or send(
        target, endpoint, body, prompt))
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "array", "items": {"type": "integer"}}))
    out = tmp_path / "r.json"
    code = serve.main(["--base-url", server.url, "--api-key", "k1", "--tokenizer", str(tiny_model), "--dataset",
                       "chat", "--input-len", "12", "--output-len", "6", "--num-prompts", "3", "--json-schema",
                       str(schema), "--chat-template-kwargs", '{"enable_thinking": false}', "--result-file", str(out)])
    assert code == 0 and json.loads(out.read_text())["runs"][0]["completed"] == 3
    assert len(bodies) == 4 and all(b["chat_template_kwargs"] == {"enable_thinking": False} and
                                    b["response_format"]["json_schema"]["schema"]["type"] == "array" for b in bodies)


@pytest.mark.parametrize("dataset", ["shared-prefix", "multi-turn"])
def test_prefix_cache_workloads(server, tiny_model, tmp_path, dataset):
    """The shared system prompt and the multi-turn conversations (each turn resends the history, answers
    included): every request completes, and the server (prefix caching on by default) reports cached prompt
    tokens; --reset-prefix-cache drops the cache before each level, so both levels see the same share."""
    out = tmp_path / "r.json"
    code = serve.main(["--base-url", server.url, "--api-key", "k1", "--tokenizer", str(tiny_model), "--dataset",
                       dataset, "--shared-len", "48", "--turns", "3", "--input-len", "10", "--output-len", "4",
                       "--num-prompts", "4", "--sweep-concurrency", "1,2", "--reset-prefix-cache", "--result-file",
                       str(out), "--plot-file", str(tmp_path / "p.png")])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    for run in runs:
        assert run["failed"] == 0 and run["completed"] == (12 if dataset == "multi-turn" else 4)
        assert 0 < run["cached_prompt_share"] < 1
    if dataset == "multi-turn":     # a conversation's later turns carry its earlier ones
        assert max(r["prompt_tokens"] for r in runs[0]["per_request"]) > 3 * 10
    assert runs[0]["cached_prompt_share"] == runs[1]["cached_prompt_share"]


def test_failures_are_counted_not_raised(server, tiny_model, tmp_path):
    args = ["--base-url", server.url, "--tokenizer", str(tiny_model), "--num-prompts", "2", "--input-len", "8",
            "--output-len", "4", "--result-file", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match="401"):  # refused at GET /v1/models, before any load
        serve.main([*args, "--api-key", "wrong"])
    # a prompt longer than the model allows: every request fails with a 400, and the run says so
    code = serve.main([*args, "--api-key", "k1", "--warmup", "0", "--input-len", "100000"])
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert code == 1 and run["completed"] == 0 and run["failed"] == 2


def test_a_silent_server_times_out_and_a_closed_port_fails():
    async def run():
        async def silent(reader, writer):
            await reader.read(1 << 16)
            await asyncio.sleep(5)
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        prompt = serve.Prompt(input_len=1, output_len=1, body={"prompt": [1]})
        slow = await serve.send(serve.Target(f"http://127.0.0.1:{port}", None, 0.3), "/v1/completions", {}, prompt)
        server.close()
        await server.wait_closed()
        closed = await serve.send(serve.Target(f"http://127.0.0.1:{port}", None, 5), "/v1/completions", {}, prompt)
        return slow, closed
    slow, closed = asyncio.run(run())
    assert not slow.ok and "TimeoutError" in slow.error
    assert not closed.ok and ("Connection" in closed.error or "OSError" in closed.error)


def test_bench_lib_runs_each_client_run_against_one_server_start(tiny_model, tmp_path):
    """benchmarks/bench_lib.sh's `bench` (the side-by-side scripts' runner): it starts the server, waits for
    /health, runs one sweep per CLIENT_RUNS line into its own result file with the server's startup time and
    memory, and stops the server (by its process group) at the end."""
    import socket
    import subprocess
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = f"""
set -euo pipefail
ROOT={root}; RESULTS={tmp_path}/results; mkdir -p $RESULTS
. $ROOT/benchmarks/bench_lib.sh
CKPT={tiny_model}
CLIENT_RUNS=". --input-len 6 --output-len 3
-chat --dataset chat --input-len 6 --output-len 3 --num-prompts 3"
bench tiny {tmp_path}/server.log {sys.executable} -m exaserve.cli serve --model {tiny_model} --dtype float32 \\
  --host 127.0.0.1 --port {port} --served-model-name bench
curl -sf -o /dev/null http://127.0.0.1:{port}/health && echo "server still up" || echo "server stopped"
"""
    env = {**os.environ, "BENCH_PYTHON": sys.executable, "NUM_PROMPTS": "2", "LEVELS": "1", "PORT": str(port),
           "BENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "server stopped" in done.stdout
    plain = json.loads((tmp_path / "results" / "tiny.json").read_text())
    chat = json.loads((tmp_path / "results" / "tiny-chat.json").read_text())
    assert [r["completed"] for r in plain["runs"]] == [2] and [r["completed"] for r in chat["runs"]] == [3]
    assert chat["meta"]["dataset"] == "chat" and plain["meta"]["dataset"] == "random"
    for doc in (plain, chat):
        assert doc["meta"]["server"]["startup_s"] > 0 and doc["meta"]["server"]["peak_rss_mib"] > 0


def _vllm_doc(concurrency, completed, failed=0, errors=()):
    """A result file as `vllm bench serve --save-result --percentile-metrics ttft,tpot,itl,e2el
    --metric-percentiles 90,99` writes it (the fields the import reads, plus some it ignores)."""
    doc = {"date": "20261130-091500", "backend": "openai", "model_id": "bench", "num_prompts": completed + failed,
           "max_concurrency": concurrency, "duration": 10.0, "completed": completed, "failed": failed,
           "total_input_tokens": 256 * completed, "total_output_tokens": 128 * completed,
           "request_throughput": completed / 10.0, "output_throughput": 12.8 * completed,
           "total_token_throughput": 38.4 * completed, "ttfts": [0.1] * completed,
           "errors": [""] * completed + list(errors)}
    for i, metric in enumerate(("ttft", "tpot", "itl", "e2el")):
        base = 100.0 * (i + 1) + concurrency
        doc.update({f"mean_{metric}_ms": base, f"median_{metric}_ms": base - 1, f"std_{metric}_ms": 3.0,
                    f"p90_{metric}_ms": base + 9, f"p99_{metric}_ms": base + 19})
    return doc


def test_vllm_client_results_import_as_ours(tmp_path, capsys):
    """compare.sh with CLIENT=vllm: `vllm bench serve` result files (one per level, in any order) become one
    result file of serve.py's format, which the side-by-side tables read unchanged."""
    files = []
    for c, done, failed, errors in ((8, 60, 5, ["HTTP 500", "HTTP 500", "timeout", "", ""]), (1, 64, 0, [])):
        path = tmp_path / f"c{c}.json"
        path.write_text(json.dumps(_vllm_doc(c, done, failed, errors)))
        files.append(path)
    out = tmp_path / "res" / "engine.json"
    assert serve.main(["--import-vllm", *map(str, files), "--label", "engine", "--result-file", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["label"] == "engine" and doc["meta"]["client"] == "vllm bench serve"
    one, eight = doc["runs"]
    assert (one["max_concurrency"], eight["max_concurrency"]) == (1, 8)
    assert (one["completed"], one["failed"], eight["completed"], eight["failed"]) == (64, 0, 60, 5)
    assert one["errors"] == []
    assert sorted((e["error"], e["count"]) for e in eight["errors"]) == [
        ("(vLLM's client recorded no message)", 2), ("HTTP 500", 2), ("timeout", 1)]
    assert eight["output_throughput"] == 12.8 * 60 and eight["prompt_tokens"] == 256 * 60
    assert eight["ttft_ms"] == {"mean": 108.0, "median": 107.0, "p90": 117.0, "p99": 127.0}
    assert eight["tpot_ms"]["median"] == 207.0 and eight["e2el_ms"]["p99"] == 427.0
    assert "max concurrency 8" in capsys.readouterr().out
    # a level that completed nothing fails the import, as it fails a run of our own client
    (tmp_path / "c32.json").write_text(json.dumps(_vllm_doc(32, 0, 64, ["refused"] * 64)))
    assert serve.main(["--import-vllm", str(tmp_path / "c32.json"), "--label", "x",
                       "--result-file", str(tmp_path / "x.json")]) == 1


def test_vllm_client_refuses_workloads_it_cannot_run(tmp_path):
    """CLIENT=vllm runs vLLM's random dataset only: any other serve.py workload is a clear error, not a run of
    something else under the same name."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    for args, said in (("--dataset chat --input-len 6", "random dataset only"),
                       ("--input-len 6 --shared-len 9", "--shared-len has no vLLM counterpart")):
        script = f"ROOT={root}; RESULTS={tmp_path}; . $ROOT/benchmarks/bench_lib.sh; vllm_client x {args}"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "BENCH_CACHE": str(tmp_path / "cache")})
        assert done.returncode == 2 and said in done.stdout, done.stdout + done.stderr
    assert not list(tmp_path.glob("*.json"))
