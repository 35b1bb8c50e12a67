"""Block-FP8 weights (engine/quantization.py, kernels/fp8.py): both published checkpoint layouts load with their
linear weights kept as FP8 in memory (or dequantized where the layout cannot hold them), `quantization="fp8"`
quantizes a checkpoint at load exactly as the release was made, the C++ FP8 kernels compute what the dequantized
weights do, and bad scales are clear errors."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.loader import CheckpointError, load_model
from exaserve.engine.quantization import Fp8Format
from exaserve.kernels import cpu_ops, fp8, torch_ops
from exaserve.testing import add_random_mtp, hf_greedy, make_hf_checkpoint, quantize_fp8, rewrite_checkpoint

GEN = 10


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Every dimension below 128, so every 128 x 128 block is partial; q/k/v (64/32/32 rows), gate/up (64 and
    32) start on 32-row groups, so the linear weights can stay FP8; the hidden size (48) gives o/down/w2 a
    narrower last panel."""
    path = tmp_path_factory.mktemp("fp8_base")
    make_hf_checkpoint(path, seed=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       intermediate_size=64, moe_intermediate_size=32)
    add_random_mtp(path, seed=5)
    return path


@pytest.fixture(scope="module", params=[("compressed-tensors", (128, 128), True), ("fp8", (32, 16), True),
                                        ("fp8", (16, 16), False)],
                ids=["compressed-tensors-128", "hf-fp8-32x16", "hf-fp8-16-dequantized"])
def pair(request, base, tmp_path_factory):
    """(FP8 checkpoint, its dequantized twin, whether its weights stay FP8): 128x128 blocks are partial on every
    matrix; 32x16 blocks are whole on some dimensions and partial on others (48 = 3 x 16, 40 = 2.5 x 16); 16-row
    blocks are finer than the 32-row groups the kernels read, so those weights are dequantized."""
    fmt, block, kept = request.param
    root = tmp_path_factory.mktemp(f"fp8_{fmt}")
    quantize_fp8(base, root / "fp8", root / "deq", fmt=fmt, block=block)
    return root / "fp8", root / "deq", kept


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(2, 96) for _ in range(rng.randint(3, 20))] for _ in range(n)]


def _generate(path, prompts, **kw):
    kw.setdefault("dtype", "float32")
    llm = LLM(str(path), max_num_seqs=4, max_num_batched_tokens=32, **kw)
    try:
        params = SamplingParams(max_tokens=GEN, temperature=0.0, logprobs=0, ignore_eos=True)
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)], llm.engine.stats()
    finally:
        llm.engine.close()


def test_the_checkpoint_is_quantized_as_published(pair):
    fp8_path, _, _ = pair
    tensors = load_file(fp8_path / "model.safetensors")
    q = [n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert q and all(n.endswith("_proj.weight") and not n.startswith("mtp.") for n in q)
    for n in ("model.layers.1.mlp.gate.weight", "lm_head.weight", "model.embed_tokens.weight",
              "mtp.layers.0.mlp.gate_proj.weight"):
        assert tensors[n].dtype == torch.float32


def _linear_params(model):
    return {n: p for n, p in model.named_parameters()
            if n.endswith(("qkv", ".o", "gate_up", "down", "w13", "w2")) and not n.startswith("mtp.")}


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_fp8_stays_fp8_and_equals_its_dequantized_weights_and_transformers(pair, kernels, caplog):
    fp8_path, deq, kept = pair
    with caplog.at_level("INFO", logger="exaserve.engine"):
        a, b = (load_model(p, torch.float32) for p in (fp8_path, deq))
    assert "FP8 checkpoint" in caplog.text and ("dequantized as float32" in caplog.text) != kept
    linear = _linear_params(a)
    assert len(linear) == 4 * 2 + 2 + 3 * 4    # qkv and o per layer; layer 0's MLP; experts + shared in 1-3
    for name, x in a.named_parameters():
        y = dict(b.named_parameters())[name]
        if name in linear and kept:
            assert x.dtype == torch.float8_e4m3fn and fp8.parts(x)[0].isfinite().all(), name
            assert torch.equal(fp8.dequantize(x), y), name
        else:   # the router, norms, embeddings, lm_head and MTP block as stored; dequantized weights
            assert x.dtype == torch.float32 and torch.equal(x, y), name
    prompts = _prompts(5, seed=2)
    got, _ = _generate(fp8_path, prompts, kernels=kernels)
    from transformers import ExaoneMoeForCausalLM
    hf = ExaoneMoeForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    for prompt, out in list(zip(prompts, got))[:3]:
        tokens, lps = hf_greedy(hf, prompt, GEN)
        assert out.token_ids == tokens
        assert max(abs(lp[t] - r) for lp, t, r in zip(out.logprobs, out.token_ids, lps)) < 1e-4


def test_quantization_fp8_at_load_equals_the_prequantized_checkpoint(base, tmp_path, caplog):
    """`quantization="fp8"` on an fp32 checkpoint gives the very bytes and scales of the FP8 checkpoint made
    from it (128 x 128 blocks, the release's ignore list), and the same tokens and logprobs."""
    quantize_fp8(base, tmp_path / "fp8", tmp_path / "deq")
    with caplog.at_level("INFO", logger="exaserve.engine"):
        online = load_model(base, torch.float32, quantization="fp8")
    assert "--quantization fp8" in caplog.text
    stored = load_model(tmp_path / "fp8", torch.float32)
    linear = _linear_params(online)
    for (name, x), (_, y) in zip(online.named_parameters(), stored.named_parameters()):
        assert x.dtype == y.dtype and (x.dtype == torch.float8_e4m3fn) == (name in linear), name
        if name in linear:
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
            assert torch.equal(fp8.parts(x)[0], fp8.parts(y)[0]), name
        else:
            assert torch.equal(x, y), name
    prompts = _prompts(4, seed=7)
    (a, _), (b, _) = _generate(base, prompts, quantization="fp8"), _generate(tmp_path / "fp8", prompts)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_model(base, quantization="int4")


def _fp8_weight(shape, block_k, seed):
    """A random FP8 weight [..., N, K] (one scale per 32 rows x block_k columns) and what it stands for."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(*shape, generator=g) * 40).clamp(-448, 448).to(fp8.FP8)
    groups = (*shape[:-2], -(-shape[-2] // fp8.ROW_GROUP), -(-shape[-1] // block_k))
    fp8.attach(q, torch.rand(*groups, generator=g) * 0.01 + 1e-3, block_k)
    return q, fp8.dequantize(q)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 40])
def test_cpu_fp8_kernels_equal_the_dequantized_weights(rows):
    """The C++ kernels read FP8 weights directly (one byte per weight, every value from subnormal to 448, both
    signs): linear, the MoE block with -1 ids (another rank's expert) and a shared expert, and a dense MLP,
    against the torch path on the dequantized weights; few rows in registers, 16 and more widened."""
    g = torch.Generator().manual_seed(rows)
    for N, K, bk in ((64, 48, 128), (96, 300, 128), (48, 200, 16), (40, 64, 32)):
        w, ref = _fp8_weight((N, K), bk, seed=N + K)
        x = torch.randn(rows, K, generator=g)
        torch.testing.assert_close(cpu_ops.linear(x, w), x @ ref.T, rtol=1e-5, atol=1e-4)
    E, H, inter, k = 4, 48, 32, 2
    (w13, r13), (w2, r2) = _fp8_weight((E, 2 * inter, H), 16, 1), _fp8_weight((E, H, inter), 16, 2)
    (sg, rsg), (sd, rsd) = _fp8_weight((2 * inter, H), 16, 3), _fp8_weight((H, inter), 16, 4)
    x = torch.randn(rows, H, generator=g) * 0.1
    ids = torch.randint(-1, E, (rows, k), generator=g)
    weights = torch.rand(rows, k, generator=g)
    want = torch_ops.fused_moe(x, r13, r2, weights, ids) + torch_ops.mlp(x, rsg, rsd)
    torch.testing.assert_close(cpu_ops.moe(x, w13, w2, weights, ids, sg, sd), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu_ops.mlp(x, sg, sd), torch_ops.mlp(x, rsg, rsd), rtol=1e-4, atol=1e-4)
    # -1 ids add nothing: the same as weight 0 on any real expert (the torch path too)
    zeroed = torch.where(ids < 0, 0.0, weights)
    torch.testing.assert_close(torch_ops.fused_moe(x, r13, r2, weights, ids),
                               torch_ops.fused_moe(x, r13, r2, zeroed, ids.clamp(min=0)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_mtp_stays_unquantized_and_drafts_as_on_the_dequantized_weights(tmp_path, fmt):
    """On a checkpoint whose MTP block predicts right (make_chain_checkpoint, agree=1), the FP8 checkpoint's
    drafts are accepted as on its dequantized twin, nearly always: the MTP block is on the ignore list and is
    loaded as stored (a peer engine built it as FP8 with uninitialised scales and got 0% acceptance)."""
    from exaserve.testing import make_chain_checkpoint
    path, _ = make_chain_checkpoint(tmp_path / "chain", agree=1.0, seed=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                    moe_intermediate_size=32)
    quantize_fp8(path, tmp_path / "fp8", tmp_path / "deq", fmt=fmt, block=(32, 16))
    model = load_model(tmp_path / "fp8")
    assert model.layers[1].mlp.w13.dtype == torch.float8_e4m3fn   # the main model runs on FP8 weights
    assert all(p.dtype == torch.float32 for p in model.mtp.parameters())
    prompts = [[3, 7], [11], [20, 5, 9]]
    (a, sa), (b, sb) = (_generate(tmp_path / p, prompts, num_speculative_tokens=2) for p in ("fp8", "deq"))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert sa["acceptance_per_position"] == sb["acceptance_per_position"]
    assert min(sa["acceptance_per_position"]) > 0.9


def test_tensor_parallel_reads_each_slice_with_its_block_scales(pair):
    """tp=2 gives one rank's tokens: slices on the block grid stay FP8 with their scales; a slice that would cut
    a block (q rows 32-63 of a 128-row block) is dequantized instead, which computes the same."""
    fp8_path, _, _ = pair
    prompts = _prompts(3, seed=4)
    one, _ = _generate(fp8_path, prompts)
    two, _ = _generate(fp8_path, prompts, tensor_parallel_size=2)
    assert [o.token_ids for o in one] == [o.token_ids for o in two]


def test_missing_misshapen_and_bad_scales_are_clear_errors(base, tmp_path):
    """A scale that is missing, misshapen or not finite, an FP8 module on the ignore list, an unknown method."""
    quantize_fp8(base, tmp_path / "fp8", tmp_path / "deq")
    name = "model.layers.1.self_attn.q_proj"
    missing = rewrite_checkpoint(tmp_path / "fp8", tmp_path / "missing", lambda t: t.pop(f"{name}.weight_scale"))
    with pytest.raises(CheckpointError, match=rf"FP8 tensor '{name}.weight' has no scale '{name}.weight_scale'"):
        load_model(missing)
    shaped = rewrite_checkpoint(tmp_path / "fp8", tmp_path / "shaped",
                          lambda t: t.__setitem__(f"{name}.weight_scale", torch.ones(2, 3)))
    with pytest.raises(CheckpointError, match=rf"scale '{name}.weight_scale' has shape \[2, 3\]"):
        load_model(shaped)
    nan = rewrite_checkpoint(tmp_path / "fp8", tmp_path / "nan",
                       lambda t: t.__setitem__(f"{name}.weight_scale", torch.full((1, 1), float("nan"))))
    with pytest.raises(CheckpointError, match=rf"scale '{name}.weight_scale' holds values that are not finite"):
        load_model(nan)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append(name)
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"'{name}.weight' is FP8 but its module is on the .*ignore list"):
        load_model(tmp_path / "fp8")
    cfg["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'awq' is not supported"):
        load_model(tmp_path / "fp8")


def test_ignore_lists_follow_each_formats_rules():
    ct = Fp8Format("compressed-tensors", (128, 128), ("lm_head", r"re:.*mlp\.gate$", r"re:mtp\..*"), "weight_scale")
    assert ct.ignored("lm_head") and ct.ignored("model.layers.3.mlp.gate") and ct.ignored("mtp.layers.0.mlp.up_proj")
    assert not ct.ignored("model.layers.3.mlp.gate_proj") and not ct.ignored("model.lm_head_x")
    hf = Fp8Format("fp8", (128, 128), ("lm_head", "mtp."), "weight_scale_inv")
    assert hf.ignored("lm_head") and hf.ignored("mtp.layers.0.self_attn.q_proj")
    assert not hf.ignored("model.layers.0.self_attn.q_proj")
