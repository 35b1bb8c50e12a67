"""The `exaserve` command line: version, errors, help with defaults; start-up messages for a missing tokenizer
and a clamped max_model_len."""
import logging

import pytest

from exaserve import __version__
from exaserve.cli import _serve_parser, main
from exaserve.engine import LLM
from exaserve.engine.tiny import make_tiny_checkpoint


def test_version_and_unknown_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"exaserve {__version__}"
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bogus'" in err and "usage: exaserve" in err


def test_serve_help_shows_defaults_and_environment():
    text = " ".join(_serve_parser().format_help().split())
    for shown in ("requests in one batch (default: 64)", "tokens per KV block (global layers) (default: 16)",
                  "port to listen on (default: 8000)", "EXASERVE_KERNELS (default auto)"):
        assert shown in text, shown


def test_missing_tokenizer_and_clamped_max_model_len(tmp_path, caplog):
    path = make_tiny_checkpoint(tmp_path / "m", with_mtp=False)
    with caplog.at_level(logging.WARNING, logger="exaserve.engine"):
        llm = LLM(str(path), kernels="torch", max_num_seqs=2, max_model_len=10**6)
    assert llm.engine.max_model_len == llm.engine.model_config.max_position_embeddings
    assert "max_model_len 1000000 is above the model's max_position_embeddings" in caplog.text
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        LLM(str(path), kernels="torch", max_num_seqs=2)
