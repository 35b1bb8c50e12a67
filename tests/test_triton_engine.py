"""The engine on the Triton kernels gives the torch path's greedy tokens (and logprobs to ~1e-4).

On CPU the kernels run in the interpreter (tests/conftest.py), so the model is tiny; on CUDA a mid-size
model runs as well. Both engines live in one process, each with the kernel backend it was built with.
"""
import random

import pytest
import torch

pytest.importorskip("triton")

from exaserve.engine import LLM, SamplingParams  # noqa: E402
from exaserve.testing import make_hf_checkpoint  # noqa: E402

MODELS = {
    # GQA group 4, a window shorter than the prompts, pages of 4 so sequences span several blocks
    "tiny": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=6),
    "mid": dict(vocab_size=512, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                sliding_window=32, num_experts=32, num_experts_per_tok=4, num_shared_experts=1,
                layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3
                + ["full_attention"], std=0.1),
}


def _generate(path, prompts, mode):
    llm = LLM(str(path), dtype="float32", max_num_seqs=4, max_num_batched_tokens=16, block_size=4, kernels=mode)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    return [o.token_ids for o in outs], [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]


@pytest.mark.parametrize("size", [
    "tiny", pytest.param("mid", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_triton_engine_matches_torch_path(size, tmp_path):
    overrides = dict(MODELS[size])
    make_hf_checkpoint(tmp_path, **overrides)
    vocab = overrides.get("vocab_size", 96)
    rng = random.Random(3)
    # three prompts: 21 tokens (chunked over steps of 16, past the window), 3 and 11; decodes of some
    # requests share steps with prefill chunks of others
    prompts = [[rng.randrange(2, vocab) for _ in range(n)] for n in (21, 3, 11)]
    torch_tokens, torch_lps = _generate(tmp_path, prompts, "torch")
    triton_tokens, triton_lps = _generate(tmp_path, prompts, "triton")
    assert triton_tokens == torch_tokens
    diff = max(abs(a - b) for x, y in zip(triton_lps, torch_lps) for a, b in zip(x, y))
    assert diff < 1e-4
