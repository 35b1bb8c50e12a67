"""`exaserve plan`: its weight bytes are what load_model puts on each rank, its KV bytes what KVCache.create
allocates, its FP8 arithmetic follows the checkpoint's tensors, bad sizes are the engine's errors, and the real
K-EXAONE config gives the facts of MODEL.md. Models are built on the meta device: nothing big is allocated."""
import json
from pathlib import Path

import pytest
import torch

from exaserve.engine.config import ModelConfig
from exaserve.engine.kv_cache import KVCache
from exaserve.engine.loader import load_model
from exaserve.engine.parallel import Parallel
from exaserve.engine.tiny import make_tiny_checkpoint
from exaserve.plan import main

K_EXAONE = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "k-exaone-236b-a23b.json"
GiB = 1 << 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # vocab 1001: the last rank's vocabulary shard is padded at tp 2 and 4
    return make_tiny_checkpoint(tmp_path_factory.mktemp("plan") / "m", vocab_size=1001)


def _plan(capsys, *argv) -> dict:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _text(capsys, *argv) -> str:
    assert main(list(map(str, argv))) == 0
    return capsys.readouterr().out


def _config(path: Path, **fields) -> Path:
    base = json.loads((K_EXAONE).read_text())
    cfg = {**base, "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 320, "moe_intermediate_size": 160,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
           "sliding_window": 16, "layer_types": None, "mlp_layer_types": None, "num_experts": 4,
           "num_experts_per_tok": 2, "max_position_embeddings": 4096, **fields}
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return path


@pytest.mark.parametrize("tp,ep,dtype", [(1, False, torch.float32), (2, False, torch.float32),
                                         (2, True, torch.bfloat16), (4, False, torch.float32)])
def test_weight_bytes_are_what_each_rank_loads(checkpoint, capsys, tp, ep, dtype):
    name = str(dtype).removeprefix("torch.")
    flags = ["--enable-expert-parallel"] if ep else []
    plan = _plan(capsys, "--model", checkpoint, "-tp", tp, *flags, "--dtype", name)
    cfg = ModelConfig.from_pretrained(checkpoint)
    assert plan["model"]["mtp"]                     # the tiny checkpoint has an MTP block, and so does its config
    for rank in range(tp):
        model = load_model(checkpoint, dtype, "cpu", cfg, par=Parallel(rank, tp, ep))
        assert model.mtp is not None
        assert plan["ranks"][rank]["weight_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan["total"]["weight_bytes"] == sum(r["weight_bytes"] for r in plan["ranks"])


def test_a_config_file_tied_embeddings_and_no_mtp(tmp_path, capsys):
    untied = _plan(capsys, "--model", _config(tmp_path / "untied.json"), "--dtype", "float32")
    tied = _plan(capsys, "--model", _config(tmp_path / "tied.json", tie_word_embeddings=True), "--dtype", "float32")
    assert untied["ranks"][0]["weight_bytes"] - tied["ranks"][0]["weight_bytes"] == 1000 * 256 * 4   # lm_head once
    no_mtp = _plan(capsys, "--model", tmp_path / "untied.json", "--dtype", "float32", "--no-mtp")
    fc, layer_norms, mlp = 256 * 512, 3 * 256, 3 * 320 * 256           # mtp.fc, its three norms, a dense MLP
    attn = (4 + 2 * 2) * 64 * 256 + 256 * 4 * 64 + 2 * 64 + 2 * 256     # q/k/v/o, q/k norms, the layer's two norms
    assert untied["ranks"][0]["weight_bytes"] - no_mtp["ranks"][0]["weight_bytes"] == 4 * (fc + layer_norms + mlp
                                                                                           + attn)


def test_fp8_counts_one_byte_per_quantized_weight_and_a_scale_per_block(tmp_path, capsys):
    """hidden 256, q rows 256, kv rows 128, dense width 320 and expert width 160: whole and partial 128-column
    blocks; the engine's own layout (ExaoneMoeModel.materialize), counted independently here."""
    path = _config(tmp_path / "config.json")
    bf16 = _plan(capsys, "--model", path, "--dtype", "bfloat16")["ranks"][0]["weight_bytes"]
    fp8 = _plan(capsys, "--model", path, "--dtype", "fp8")
    H, E = 256, 4

    def scales(r, c):   # in memory: one per 32 rows x 128 columns (kernels/fp8.py)
        return -(-r // 32) * -(-c // 128)
    # the quantized checkpoint tensors [out, in] of the main layers (MODEL.md); the MTP block stays bf16
    attn = [(256, H), (128, H), (128, H), (H, 256)]
    dense, expert = [(320, H), (320, H), (H, 320)], [(160, H), (160, H), (H, 160)]
    tensors = 4 * attn + dense + 3 * (E * expert + expert)                # layer 0 dense, 1..3 MoE + shared
    saved = sum(2 * r * c - (r * c + 4 * scales(r, c)) for r, c in tensors)
    assert fp8["ranks"][0]["weight_bytes"] == bf16 - saved
    assert fp8["kv_dtype"] == "bfloat16"
    assert fp8["ranks"][0]["kv_bytes_per_token"] == _plan(capsys, "--model", path, "--dtype", "bfloat16")[
        "ranks"][0]["kv_bytes_per_token"]


@pytest.mark.parametrize("tp,spec", [(1, 0), (2, 2), (4, 0)])
def test_kv_bytes_are_what_kv_cache_create_allocates(checkpoint, capsys, tp, spec):
    cfg = ModelConfig.from_pretrained(checkpoint)
    for memory in ("8MiB", "141GiB"):     # the blocks bounded by the memory, then by max_num_seqs full sequences
        args = ("--model", checkpoint, "-tp", tp, "--gpu-memory", memory, "--reserve", "0", "--max-num-seqs", 8,
                "--block-size", 32, "--num-speculative-tokens", spec)
        plain, cached = _plan(capsys, *args, "--no-enable-prefix-caching"), _plan(capsys, *args)
        for rank, (r, c) in enumerate(zip(plain["ranks"], cached["ranks"])):
            def create(prefix_caching, budget=r["kv_budget_bytes"], rank=rank):
                return KVCache.create(cfg, kv_cache_memory=budget, max_num_seqs=8, block_size=32,
                                      max_model_len=cfg.max_position_embeddings, max_rollback=spec,
                                      extra_ring_layers=1 if spec else 0, dtype=torch.float32, device="meta",
                                      num_kv_heads=Parallel(rank, tp).kv_heads(cfg.num_kv_heads)[1],
                                      prefix_caching=prefix_caching)
            kv = create(False)
            assert r["kv_bytes_per_token"] == kv.paged.nbytes // (kv.paged.num_blocks * 32)
            assert r["ring_bytes_per_seq"] == kv.ring.nbytes // 8
            assert r["engine_pool"] == {"ring_bytes": kv.ring.nbytes, "num_blocks": kv.paged.num_blocks}
            per_seq = r["ring_bytes_per_seq"] + 32 * 1024 * r["kv_bytes_per_token"]
            assert r["max_seqs"]["32768"] == r["kv_budget_bytes"] // per_seq
            # prefix caching (serve's default): the ring snapshots' share leaves the blocks KVCache.create makes
            assert c["engine_pool"]["num_blocks"] == create(True).paged.num_blocks
            assert c["max_seqs"]["32768"] <= r["max_seqs"]["32768"]


def test_sizes_that_do_not_divide_and_bad_options_exit_2(checkpoint, tmp_path, capsys):
    assert main(["--model", str(checkpoint), "-tp", "3"]) == 2
    assert "num_attention_heads (4) is not divisible by tensor_parallel_size (3)" in capsys.readouterr().err
    assert main(["--model", str(_config(tmp_path / "c.json", num_experts=6)), "-tp", "4",
                 "--enable-expert-parallel"]) == 2
    assert "num_experts (6) is not divisible by tensor_parallel_size (4)" in capsys.readouterr().err
    assert main(["--model", str(checkpoint), "--no-mtp", "--num-speculative-tokens", "2"]) == 2
    assert "needs the MTP block" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_k_exaone_on_h200s(capsys):
    """MODEL.md: ~236B + 0.53B (MTP) parameters, ~240 GB in FP8; KV 48 KiB per token and ~18 MiB of rings per
    sequence over all ranks; one 141 GiB GPU cannot hold it."""
    text = _text(capsys, "--model", K_EXAONE, "--dtype", "bfloat16")
    assert "does not fit: rank 0 holds" in text and "tensor parallel 1" in text
    for tp in (4, 8):
        bf16 = _plan(capsys, "--model", K_EXAONE, "-tp", tp)          # auto: the config's bfloat16
        fp8 = _plan(capsys, "--model", K_EXAONE, "-tp", tp, "--dtype", "fp8")
        assert bf16["dtype"] == "bfloat16" and bf16["model"]["mtp"]
        for p in (bf16, fp8):
            assert p["total"]["fits"] and p["total"]["kv_bytes_per_token"] == 48 << 10
            assert p["total"]["ring_bytes_per_seq"] == 36 * 128 * (4 << 10)
            assert p["total"]["max_seqs"]["262144"] >= 1
        assert 470e9 < bf16["ranks"][0]["weight_bytes"] * tp < 480e9
        assert 235e9 < fp8["ranks"][0]["weight_bytes"] * tp < 245e9
        text = _text(capsys, "--model", K_EXAONE, "-tp", tp, "--dtype", "fp8")
        assert f"0-{tp - 1}" in text and "fits on" in text and "as the engine holds it" in text
    ep = _plan(capsys, "--model", K_EXAONE, "-tp", 8, "--enable-expert-parallel")
    assert ep["expert_parallel"] and ep["total"]["fits"]
