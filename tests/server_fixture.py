"""A live `exaserve serve` subprocess for tests, and the tiny checkpoint it serves.

Test modules load this as a plugin (`pytest_plugins = ["server_fixture"]`, and no direct import, so
pytest can rewrite its asserts): that brings the fixtures `live_server` and `tiny_model`, and a hook that
appends the log of every running server to a failing test's report.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

_running: list["LiveServer"] = []
_stopped: list["LiveServer"] = []  # since the last report: a test that ran its own server still gets its log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model_dir, *args: str, api_key: str | None = None, env: dict | None = None,
                 code: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self._log = tempfile.NamedTemporaryFile(prefix="exaserve-", suffix=".log", delete=False)
        self._final_log: str | None = None
        model = ("--model", str(model_dir)) if model_dir is not None else ()
        # code: Python run first in the server's interpreter (fault injection), then the CLI as -m would run it
        start = ["-m", "exaserve.cli"] if code is None else \
            ["-c", f"{code}\nimport sys; from exaserve.cli import main; sys.exit(main(sys.argv[1:]))"]
        command = [sys.executable, *start, "serve", *model, "--port", str(self.port), *args,
                   *(("--api-key", api_key) if api_key else ())]
        env = {**{k: v for k, v in os.environ.items() if k != "EXASERVE_API_KEY"}, **(env or {})}
        self.proc = subprocess.Popen(command, cwd=tempfile.gettempdir(), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exaserve exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"exaserve was not ready after {timeout} s:\n{self.log()}")

    def log(self, tail: int = 20000) -> str:
        if self._final_log is not None:
            return self._final_log[-tail:]
        return Path(self._log.name).read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._final_log = self.log(tail=10**9)
        os.unlink(self._log.name)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, async_client: bool = False, api_key: str | None = None):
        """An official client for this server (its key unless api_key is given), without retries."""
        import openai

        cls = openai.AsyncOpenAI if async_client else openai.OpenAI
        return cls(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name."""
        text = httpx.get(f"{self.url}/metrics").text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples


@contextmanager
def _live_server(model_dir, *args: str, api_key: str | None = None, env: dict | None = None,
                 code: str | None = None):
    """Start `python -m exaserve.cli serve` on a free 127.0.0.1 port; stop it by its PID afterwards.
    model_dir None: no --model (the built-in tiny checkpoint); env: extra environment variables; code: Python
    the server's interpreter runs before the CLI."""
    server = LiveServer(model_dir, *args, api_key=api_key, env=env, code=code)
    _running.append(server)
    try:
        server.wait_ready()
        yield server
    finally:
        _running.remove(server)
        server.stop()
        _stopped.append(server)


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(model_dir, *serve_args, api_key=None, env=None, code=None) as server:` a started
    server."""
    return _live_server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from exaserve.engine.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("server_tiny"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    servers = _running + _stopped
    _stopped.clear()
    if report.failed:
        for server in servers:
            report.sections.append((f"exaserve log ({server.url})", server.log()))
