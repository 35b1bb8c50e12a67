"""Config parsing, checkpoint loading and the clear errors for bad checkpoints."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from exaserve.engine.config import ConfigError, ModelConfig
from exaserve.engine.loader import CheckpointError, load_model
from exaserve.engine.tiny import make_tiny_checkpoint
from exaserve.testing import rewrite_checkpoint

BASE = {"model_type": "exaone_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 16, "num_experts": 4,
        "num_experts_per_tok": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_config_traps():
    c = ModelConfig.from_dict({**BASE, "sliding_window_pattern": 4, "rope_theta": 5e5, "scoring_func": "sigmoid",
                               "eos_token_id": [53, 54]})
    assert c.head_dim == 8                                        # hidden // heads when absent
    assert c.layer_types == ["sliding"] * 3 + ["full"] + ["sliding"] * 3 + ["full"]
    assert c.rope_theta == 5e5 and c.eos_token_ids == [53, 54]
    assert c.mlp_types == ["dense"] + ["sparse"] * 7             # first_k_dense_replace defaults to 1
    c = ModelConfig.from_dict({**BASE, "head_dim": 128, "sliding_window_pattern": "LLG",
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                               "first_k_dense_replace": 2, "eos_token_id": 53})
    assert c.head_dim == 128 and c.rope_theta == 1e6 and c.eos_token_ids == [53]
    assert c.layer_types == ["sliding", "sliding", "full"] * 2 + ["sliding", "sliding"]
    assert c.mlp_types == ["dense", "dense"] + ["sparse"] * 6
    explicit = ["full_attention"] * 8
    c = ModelConfig.from_dict({**BASE, "sliding_window_pattern": 4, "layer_types": explicit,
                               "mlp_layer_types": ["sparse"] * 8})
    assert c.layer_types == ["full"] * 8 and c.mlp_types == ["sparse"] * 8
    assert ModelConfig.from_dict(BASE).rope_theta == 10000.0
    assert ModelConfig.from_dict(BASE).checkpoint_dtype == "float32"
    assert ModelConfig.from_dict({**BASE, "torch_dtype": "bfloat16"}).checkpoint_dtype == "bfloat16"   # legacy key
    assert ModelConfig.from_dict({**BASE, "dtype": "float16"}).checkpoint_dtype == "float16"


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "only 'exaone_moe'"),
    ({"num_key_value_heads": 3}, "not divisible"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"sliding_window_pattern": "LXG"}, "only 'L' and 'G'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_config_errors(change, message):
    d = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_missing_unexpected_and_misshapen_tensors(tiny, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    bad = rewrite_checkpoint(tiny, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_model(bad)
    bad = rewrite_checkpoint(tiny, tmp_path / "extra",
                             lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.bogus.weight'"):
        load_model(bad)
    bad = rewrite_checkpoint(tiny, tmp_path / "shape", lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[3, 3\]"):
        load_model(bad)
    ok = rewrite_checkpoint(tiny, tmp_path / "inv_freq",
                             lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    load_model(ok)                                                # known-ignorable tensors are skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="config.json"):
        load_model(tmp_path / "empty")


def test_sharded_equals_single_and_keeps_mtp(tiny, tmp_path):
    tensors = load_file(tiny / "model.safetensors")
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / fname)
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(tiny), load_model(sharded)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a.mtp is not None
    assert torch.equal(a.mtp.fc, tensors["mtp.fc.weight"])
    up = tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    assert torch.equal(a.layers[2].mlp.w13[5, up.shape[0]:], up)       # experts stacked, gate rows first
    v_rows = -up.shape[1] // 2
    assert torch.equal(a.layers[2].attn.qkv[v_rows:], tensors["model.layers.2.self_attn.v_proj.weight"][v_rows:])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtypes_keep_router_in_fp32(tiny, dtype):
    m = load_model(tiny, dtype=dtype)
    assert m.embed.dtype == getattr(torch, dtype)
    assert m.layers[1].mlp.router.dtype == torch.float32 and m.layers[1].mlp.bias.dtype == torch.float32
    assert m.layers[1].mlp.w13.dtype == getattr(torch, dtype)


def test_tied_embeddings(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("lm_head.weight", None)
    save_file(tensors, path / "model.safetensors")
    m = load_model(path)
    assert m.lm_head is m.embed


def test_peak_host_memory_during_load(tmp_path):
    """Loading a ~100 MB checkpoint raises peak RSS by well under 1.3x its weight bytes."""
    path = make_tiny_checkpoint(tmp_path / "big", hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
                                num_experts=32, num_hidden_layers=4)
    code = textwrap.dedent(f"""
        import torch
        torch.zeros(1).numpy()  # libraries paged in before the baseline
        from exaserve.engine.loader import load_model
        def status(key):  # VmHWM is this process's own peak (ru_maxrss would include the forking parent's)
            line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))
            return int(line.split()[1]) * 1024
        before = status('VmRSS')
        m = load_model({str(path)!r})
        weights = sum(p.numel() * p.element_size() for p in m.parameters())
        print(weights, status('VmHWM') - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    weights, grown = map(int, out.stdout.split())
    assert weights > 50e6
    assert grown < 1.3 * weights, (grown, weights)
