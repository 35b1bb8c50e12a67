"""EngineConfig (every engine knob, validated), the EXASERVE_* registry, the CLI flags that build the config,
and a kernel backend chosen once at start-up."""
import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from exaserve import kernels
from exaserve.cli import _serve_parser
from exaserve.engine import LLM, envs
from exaserve.engine.config import ConfigError, EngineConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("options, message", [
    (dict(dtype="fp8"), "dtype='fp8'; use one of auto, bfloat16, float16, float32"),
    (dict(device="tpu"), "device='tpu'; use auto, cpu, cuda or cuda:N"),
    (dict(kernels="gpu"), "kernels='gpu'; use one of auto, torch, cpu, triton"),
    (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
    (dict(block_size=2.5), "block_size must be an integer, got 2.5"),
    (dict(kv_cache_memory=-1), "kv_cache_memory must be >= 1, got -1"),
    (dict(num_speculative_tokens=5), "num_speculative_tokens must be 0..4, got 5"),
    (dict(spec_max_batch_size=True), "spec_max_batch_size must be an integer, got True"),
])
def test_engine_config_rejects_bad_values(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        EngineConfig("/some/checkpoint", **options)


def test_engine_config_of_options_or_a_config():
    config = EngineConfig("/m", block_size=4)
    assert EngineConfig.of(config, {}) is config
    assert EngineConfig.of("/m", {"block_size": 4}) == config
    with pytest.raises(TypeError, match="beside an EngineConfig"):
        EngineConfig.of(config, {"block_size": 8})
    with pytest.raises(TypeError, match="max_num_seq"):     # a misspelt option is not silently dropped
        EngineConfig.of("/m", {"max_num_seq": 4})


def test_every_engine_option_has_a_serve_flag():
    """The CLI builds the EngineConfig from flags of the same names: none may be missing."""
    flags = {a.dest for a in _serve_parser()._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= flags


def test_env_registry_parses_and_names_bad_values(caplog):
    assert envs.read({}) == envs.Env()
    env = envs.read({"EXASERVE_KERNELS": "torch", "EXASERVE_ARGMAX_SCREEN": "0",
                     "EXASERVE_CPU_EXT_CFLAGS": "-DEXA_PREFETCH=64 -DX", "EXASERVE_API_KEY": "k"})
    assert env == envs.Env(kernels="torch", argmax_screen=False, cpu_ext_cflags=("-DEXA_PREFETCH=64", "-DX"),
                           api_key="k")
    with pytest.raises(ValueError, match="EXASERVE_KERNELS='cuda': use one of auto, torch, cpu, triton"):
        envs.read({"EXASERVE_KERNELS": "cuda"})
    with pytest.raises(ValueError, match="EXASERVE_ARGMAX_SCREEN='maybe': use 1 or 0"):
        envs.read({"EXASERVE_ARGMAX_SCREEN": "maybe"})
    with caplog.at_level(logging.WARNING, logger="exaserve.engine"):
        envs.read({"EXASERVE_ARGMAX_SCREM": "0"})
    assert "unknown environment variable EXASERVE_ARGMAX_SCREM" in caplog.text


def _source_files():
    for folder in ("engine", "kernels", "server", "exaserve", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".cpp", ".h"):
                yield path


def test_every_exaserve_variable_is_declared_read_in_one_place_and_documented():
    readme = (ROOT / "README.md").read_text()
    for name in envs.VARIABLES:
        assert name in readme, f"{name} is not documented in the README"
    for path in _source_files():
        text = path.read_text()
        for name in set(re.findall(r"\bEXASERVE_[A-Z0-9_]+", text)):
            assert name in envs.VARIABLES, f"{path.relative_to(ROOT)} uses {name}, which engine/envs.py lacks"
        if path.name != "envs.py":
            assert not re.search(r"(environ\.get|getenv|environ\[)\(?\s*[\"']EXASERVE_", text), \
                f"{path.relative_to(ROOT)} reads an EXASERVE_* variable itself; engine/envs.py reads them"


def test_the_backend_is_chosen_once_at_start_up(tmp_path, monkeypatch):
    from exaserve.engine.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "m", with_mtp=False)
    llm = LLM(str(path), kernels="torch", max_num_seqs=2)
    assert llm.engine.ops.name == "torch" and llm.engine.model.ops is llm.engine.ops
    assert llm.engine.runner.cpu_model is None
    monkeypatch.setenv("EXASERVE_KERNELS", "torch")          # the environment, when the option is not given
    assert LLM(str(path), max_num_seqs=2).engine.ops.name == "torch"
    monkeypatch.setenv("EXASERVE_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="EXASERVE_KERNELS='nonsense'"):
        LLM(str(path), max_num_seqs=2)
    monkeypatch.delenv("EXASERVE_KERNELS")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kernels.BackendError, match="kernel backend 'triton' cannot run here"):
        LLM(str(path), kernels="triton", device="cpu")


def test_serve_refuses_a_backend_this_machine_cannot_run(tmp_path):
    from exaserve.engine.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "m", with_mtp=False)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EXASERVE_KERNELS")}
    done = subprocess.run([sys.executable, "-m", "exaserve.cli", "serve", "--model", str(path), "--device", "cpu",
                           "--kernels", "triton", "--port", "1"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tempfile.gettempdir())
    assert done.returncode != 0
    assert "kernel backend 'triton' cannot run here: the Triton kernels need a CUDA device" in done.stderr


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "0.9"])
def test_gpu_memory_utilization_is_checked(value):
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        EngineConfig("m", gpu_memory_utilization=value)
