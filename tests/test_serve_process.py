"""The `exaserve serve` process: the port taken before loading, slow clients, shutdown, a dead engine."""
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

pytest_plugins = ["server_fixture"]

# Steps of 10 ms or more, so a stream of the tiny model is still running when the test signals the server.
SLOW_STEPS = ("import time\nfrom exaserve.engine import engine_core as ec\nstep = ec.EngineCore.step\n"
              "ec.EngineCore.step = lambda self, *a, **k: (time.sleep(0.01), step(self, *a, **k))[1]")


def test_busy_port_fails_before_loading(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "exaserve", "serve", "--model", str(tiny_model), "--port",
                               str(port)], capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Loaded" not in done.stderr  # it stopped before loading the model


def test_half_sent_requests_are_closed_and_others_served(tiny_model, live_server):
    import resource
    with live_server(tiny_model, "--request-timeout", "1") as server:
        proc, url = server.proc, server.url
        # each connection is a file descriptor: the soft limit is raised (up to the hard one) at start
        line = next(x for x in open(f"/proc/{proc.pid}/limits") if x.startswith("Max open files"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
        assert int(line.split()[3]) >= want
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        slow = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"prompt": "a b", "max_tokens": 2}).encode()
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.4)
        slow.sendall(body)  # slow but within the timeout: answered
        for conn in (silent, partial):
            conn.settimeout(10)
            started = time.monotonic()
            assert conn.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 5
            conn.close()
        slow.settimeout(10)
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")
        slow.close()
        assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def _open_stream(url: str, max_tokens: int = 3000):
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", url + "/v1/completions", json={
        "prompt": "a b c", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: {"))
    assert "choices" in first
    return client, lines


def test_sigterm_ends_streams_with_an_error_event_at_the_deadline(tiny_model, live_server):
    with live_server(tiny_model, "--shutdown-timeout", "1", code=SLOW_STEPS) as server:
        proc = server.proc
        client, lines = _open_stream(server.url)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))
        assert "shutting down" in error["error"]["message"]
        assert time.monotonic() - started < 8
        # a clean exit; uvicorn re-raises the signal it caught once it has shut down
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        client.close()


def test_second_signal_exits_at_once(tiny_model, live_server):
    with live_server(tiny_model, "--shutdown-timeout", "60", code=SLOW_STEPS) as server:
        proc = server.proc
        client, lines = _open_stream(server.url)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first signal waits for the stream
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        client.close()


def test_dead_engine_exits_non_zero(tiny_model, live_server):
    """An engine thread that dies turns /health to 503 and ends the process with a non-zero status, so an
    orchestrator restarts it."""
    code = ("from exaserve.engine import engine_core as ec\n"
            "class Death(BaseException): pass\n"
            "step = ec.EngineCore.step\n"
            "def dying(self, *a, **k):\n"
            "    if any(r.prompt_token_ids[-1] == 7 for r in self.requests.values()): raise Death('injected')\n"
            "    return step(self, *a, **k)\n"
            "ec.EngineCore.step = dying")
    with live_server(tiny_model, code=code) as server:
        url = server.url
        assert httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 200
        response = httpx.post(url + "/v1/completions", json={"prompt": [5, 7], "max_tokens": 2}, timeout=30)
        assert response.status_code >= 500
        assert server.proc.wait(timeout=15) == 1
        assert "the engine stopped" in server.log()
