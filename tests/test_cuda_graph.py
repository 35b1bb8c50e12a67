"""CUDA-graph decode (engine/cuda_graph.py) without CUDA: the ladder, the static buffers and their padding, and
the engine on the Triton kernels (interpreter) with each "graph" an eager run over the static buffers, which is
what a captured graph replays. Capture itself needs a GPU: benchmarks/gpu_check.sh checks greedy equality with
graphs on and off there."""
import random

import pytest
import torch

pytest.importorskip("triton")

from exaserve.engine import LLM, SamplingParams  # noqa: E402
from exaserve.engine.cuda_graph import Captured, DecodeGraphs, StaticInputs, ladder  # noqa: E402
from exaserve.engine.model import AttnMetadata  # noqa: E402
from exaserve.testing import make_hf_checkpoint  # noqa: E402


def test_ladder():
    assert ladder(1) == [1]
    assert ladder(3) == [1, 2, 3]
    assert ladder(8) == [1, 2, 4, 8]
    assert ladder(20) == [1, 2, 4, 8, 16, 20]
    sizes = ladder(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))
    with pytest.raises(ValueError, match="max_batch_size"):
        ladder(0)


def test_size_for():
    graphs = DecodeGraphs(lambda *a: None, None, 20, 4, "cpu")
    assert [graphs.size_for(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 20)] == [1, 2, 4, 4, 8, 8, 16, 16, 20, 20]
    assert graphs.size_for(21) is None


def _decode_meta(b, width, base=0):
    i = torch.arange(b)
    return AttnMetadata(query_start_loc=torch.arange(b + 1, dtype=torch.int32),
                        context_lens=(i + 5 + base).int(), seq_lens=(i + 6 + base).int(),
                        block_tables=(i[:, None] * width + torch.arange(width) + 1 + base).int(),
                        slot_mapping=i * 4 + 3 + base, ring_slots=i + 1 + base, ring_mapping=i * 8 + 2 + base)


def test_static_inputs_padding():
    """A batch of 3 loaded for size 8 after one of 6: the 3 rows are the batch's, rows 3..7 write nowhere (both
    slot mappings -1) and read nothing (contexts 0), whatever the earlier batch left there; a table narrower than
    the fixed width fills its first columns."""
    static = StaticInputs(8, 6, "cpu")
    assert static.nbytes() == 8 * (5 * 8 + 2 * 4 + 6 * 4) + 9 * 4
    static.load(torch.arange(6) + 10, torch.arange(6) + 20, _decode_meta(6, 5, base=100), 8)
    meta = _decode_meta(3, 2)
    static.load(torch.arange(3) + 30, torch.arange(3) + 40, meta, 8)
    ids, pos, view = static.views(8)
    assert ids[:3].tolist() == [30, 31, 32] and pos[:3].tolist() == [40, 41, 42]
    assert torch.equal(view.slot_mapping[:3], meta.slot_mapping) and (view.slot_mapping[3:] == -1).all()
    assert torch.equal(view.ring_mapping[:3], meta.ring_mapping) and (view.ring_mapping[3:] == -1).all()
    assert torch.equal(view.context_lens[:3], meta.context_lens) and (view.context_lens[3:] == 0).all()
    assert torch.equal(view.seq_lens[:3], meta.seq_lens) and (view.seq_lens[3:] == 0).all()
    assert torch.equal(view.block_tables[:3, :2], meta.block_tables) and view.block_tables.shape == (8, 6)
    assert view.query_start_loc.tolist() == list(range(9))
    assert torch.equal(view.ring_slots[:3], meta.ring_slots)
    # the views are the buffers themselves: a graph captured on them sees every later load
    assert view.slot_mapping.data_ptr() == static.slot_mapping.data_ptr()


def test_what_runs_eagerly():
    """Replayed: decode-only batches within the ladder and the table width. Eager: mixed batches (more tokens
    than sequences), batches above the ladder, tables wider than the fixed width."""
    graphs = DecodeGraphs(lambda *a: None, None, 4, 3, "cpu")
    assert graphs.replayable(torch.zeros(3), _decode_meta(3, 3)) == 4
    assert graphs.replayable(torch.zeros(4), _decode_meta(3, 3)) is None
    assert graphs.replayable(torch.zeros(5), _decode_meta(5, 3)) is None
    assert graphs.replayable(torch.zeros(2), _decode_meta(2, 4)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_capture_without_cuda_is_a_clear_error():
    graphs = DecodeGraphs(lambda *a: None, None, 2, 3, "cpu")
    with pytest.raises(RuntimeError, match="CUDA graph capture of the decode step at batch size 2 failed"):
        graphs.capture()


def _eager_stand_in(graphs: DecodeGraphs):
    """capture_one for a CPU: the warm-up run of a CUDA capture (all padding), then replay = an eager forward over
    the same static views, written into a fixed output buffer like a graph's."""
    def capture_one(size):
        args = (*graphs.static.views(size), graphs.kv)
        output = graphs.eager(*args).clone()

        def replay():
            output.copy_(graphs.eager(*args))
        return Captured(replay, output)
    return capture_one


def _generate(path, prompts, graphs: bool, monkeypatch):
    """Eager on the torch path (the reference, fast), or graphed on the Triton kernels."""
    llm = LLM(str(path), dtype="float32", kernels="triton" if graphs else "torch", max_num_seqs=4,
              max_num_batched_tokens=16, block_size=4)
    runner = llm.engine.runner
    pools = llm.engine.kv.paged, llm.engine.kv.ring
    if graphs:
        before = [t.clone() for pool in pools for t in (*pool.k, *pool.v)]
        monkeypatch.setattr(DecodeGraphs, "_cuda_capture", lambda self, size: _eager_stand_in(self)(size))
        runner.use_cuda_graphs(4, llm.engine.max_model_len)
        # capture runs the model on all-padding inputs: it must write no KV
        assert all(torch.equal(a, b) for a, b in zip(before, (t for pool in pools for t in (*pool.k, *pool.v))))
    # different lengths: decode batches of 3 (padded to 4), 2 and 1, and steps mixing a prefill with decodes
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True)
                                  for n in (6, 4, 2)], use_tqdm=False)
    kv = [t.clone() for pool in pools for t in (*pool.k, *pool.v)]
    replays = runner.graphs.replays if graphs else 0
    llm.engine.close()
    tokens = [o.outputs[0].token_ids for o in outs]
    lps = [[lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, lps, kv, replays


def test_engine_with_graphs_matches_eager(tmp_path, monkeypatch):
    """Greedy tokens and logprobs of the graphed Triton path equal the eager torch path's (which equals the eager
    Triton path's: tests/test_triton_engine.py), decode steps replayed, and the KV pools hold values at exactly
    the same places afterwards (padding rows wrote nowhere), equal to float rounding."""
    make_hf_checkpoint(tmp_path, num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=6)
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 96) for _ in range(n)] for n in (5, 3, 9)]
    eager_tokens, eager_lps, eager_kv, _ = _generate(tmp_path, prompts, False, monkeypatch)
    tokens, lps, kv, replays = _generate(tmp_path, prompts, True, monkeypatch)
    assert replays >= 3
    assert tokens == eager_tokens
    assert max(abs(a - b) for x, y in zip(lps, eager_lps) for a, b in zip(x, y)) < 1e-4
    assert all(torch.equal(a != 0, b != 0) for a, b in zip(kv, eager_kv))
    assert max((a - b).abs().max().item() for a, b in zip(kv, eager_kv)) < 1e-4
