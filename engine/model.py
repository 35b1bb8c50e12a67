"""EXAONE-MoE on one flat batch of tokens (no padding), attention through the two KV pools.

Parameter layout differs from the checkpoint where the kernels want it: q/k/v rows fused into `qkv`,
gate/up rows fused into `gate_up`, experts stacked into `w13 [E, 2I, H]` and `w2 [E, H, I]`
(engine/loader.py maps the on-disk names). Every op goes through the op table `ops` (exaserve.kernels.select)
chosen once per engine.

Under tensor parallelism (engine/parallel.py) each rank builds the same modules with its share of every split
dimension and `par` reduces the partial outputs; with the default `SINGLE` the shapes are the full ones.

The same computation exists fused in C++: kernels/cpu/layer.h runs a whole DecoderLayer (and the step from the
embedding to the logits) in one call; engine/cpu_model.py builds it from this module after loading. A change
to a layer here must be made there too (tests/test_parity.py and tests/test_cpu_kernels.py compare them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exaserve.engine.config import ModelConfig
from exaserve.engine.parallel import SINGLE, Parallel
from exaserve.kernels import Ops, fp8


@dataclass
class AttnMetadata:
    """Where each token of a flat batch belongs; built by the runner once per step."""
    query_start_loc: torch.Tensor   # [S+1] int32: tokens of sequence s are rows qsl[s]:qsl[s+1]
    context_lens: torch.Tensor      # [S] tokens already in the cache before this step
    seq_lens: torch.Tensor          # [S] context after this step
    block_tables: torch.Tensor      # [S, max_blocks] int32 (global layers)
    slot_mapping: torch.Tensor      # [T] int64 flat paged slot of each token
    ring_slots: torch.Tensor        # [S] int64 ring slot of each sequence (sliding layers)
    ring_mapping: torch.Tensor      # [T] int64 flat ring row of each token, -1 = not stored


def _param(*shape, dtype):
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class MLP(nn.Module):
    """SwiGLU; under tensor parallelism each rank holds `width / size` of the intermediate dimension and returns
    a partial sum (the caller all-reduces)."""

    def __init__(self, ops: Ops, hidden: int, width: int, dtype, par: Parallel = SINGLE, what="intermediate_size"):
        super().__init__()
        self.ops = ops
        width = par.part(width, what)
        self.gate_up = _param(2 * width, hidden, dtype=dtype)
        self.down = _param(hidden, width, dtype=dtype)

    def forward(self, x):
        return self.ops.mlp(x, self.gate_up, self.down)


class MoE(nn.Module):
    """Routed experts + shared expert, one partial sum per rank under tensor parallelism: each expert split on
    its intermediate dimension, or (expert parallel) experts [first_expert, first_expert + E_local) whole. The
    router is replicated, so every rank routes alike."""

    def __init__(self, ops: Ops, cfg: ModelConfig, dtype, par: Parallel = SINGLE):
        super().__init__()
        self.ops, self.cfg = ops, cfg
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.first_expert, self.num_local_experts = 0, E
        if par.size > 1 and par.expert_parallel:
            self.num_local_experts = par.part(E, "num_experts")
            self.first_expert = par.rank * self.num_local_experts
        else:
            I = par.part(I, "moe_intermediate_size")
        self.router = _param(E, H, dtype=torch.float32)
        self.bias = _param(E, dtype=torch.float32)
        self.w13 = _param(self.num_local_experts, 2 * I, H, dtype=dtype)
        self.w2 = _param(self.num_local_experts, H, I, dtype=dtype)
        self.shared = MLP(ops, H, cfg.moe_intermediate_size * cfg.num_shared_experts, dtype, par,
                          "moe_intermediate_size x num_shared_experts") if cfg.num_shared_experts else None

    def forward(self, x):
        c = self.cfg
        weights, ids = self.ops.moe_route(x, self.router, self.bias, c.top_k, c.n_group, c.topk_group,
                                          c.norm_topk_prob, c.routed_scaling_factor)
        if self.num_local_experts != c.num_experts:
            # Expert parallel: local expert ids; another rank's expert is -1, which every backend's fused_moe
            # skips (no work, adds nothing).
            local = ids - self.first_expert
            ids = torch.where((local >= 0) & (local < self.num_local_experts), local, -1)
        shared = (None, None) if self.shared is None else (self.shared.gate_up, self.shared.down)
        return self.ops.moe(x, self.w13, self.w2, weights, ids, *shared)


class Attention(nn.Module):
    """Under tensor parallelism: this rank's q heads and kv heads (engine/parallel.py), and a partial output
    (o_proj split on its input; the caller all-reduces)."""

    def __init__(self, ops: Ops, cfg: ModelConfig, sliding: bool, dtype, par: Parallel = SINGLE):
        super().__init__()
        self.ops = ops
        self.nq, self.d = par.part(cfg.num_heads, "num_attention_heads"), cfg.head_dim
        self.first_kv_head, self.nkv = par.kv_heads(cfg.num_kv_heads)
        self.sliding = sliding
        self.use_rope = sliding or cfg.sliding_window is None   # global layers are NoPE when windows exist
        self.window = cfg.sliding_window
        self.eps = cfg.rms_norm_eps
        self.scale = self.d ** -0.5
        self.qkv = _param((self.nq + 2 * self.nkv) * self.d, cfg.hidden_size, dtype=dtype)
        self.o = _param(cfg.hidden_size, self.nq * self.d, dtype=dtype)
        self.q_norm = _param(self.d, dtype=dtype)
        self.k_norm = _param(self.d, dtype=dtype)

    def forward(self, x, positions, meta: AttnMetadata, k_cache, v_cache, rope):
        T, ops = x.shape[0], self.ops
        q, k, v = ops.linear(x, self.qkv).split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q, k = ops.qk_norm_rope(q.reshape(T, self.nq, self.d), k.reshape(T, self.nkv, self.d), self.q_norm,
                                    self.k_norm, self.eps, positions, *rope, self.use_rope)
        v = v.reshape(T, self.nkv, self.d)
        if self.sliding:
            # Attend first, then store: a chunk longer than ring_len - window would overwrite rows that its
            # own earlier queries still read.
            o = ops.ring_attention(q, k, v, k_cache, v_cache, meta.ring_slots, meta.query_start_loc,
                                       meta.context_lens, self.window, self.scale)
            ops.write_kv(k, v, k_cache, v_cache, meta.ring_mapping)
        else:
            ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            o = ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                        meta.query_start_loc, self.scale)
        return ops.linear(o.reshape(T, self.nq * self.d), self.o)


class DecoderLayer(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, sliding: bool, sparse: bool, dtype, par: Parallel = SINGLE):
        super().__init__()
        self.ops, self.par = ops, par
        self.eps = cfg.rms_norm_eps
        self.sliding = sliding
        self.input_norm = _param(cfg.hidden_size, dtype=dtype)
        self.post_norm = _param(cfg.hidden_size, dtype=dtype)
        self.attn = Attention(ops, cfg, sliding, dtype, par)
        self.mlp = MoE(ops, cfg, dtype, par) if sparse else MLP(ops, cfg.hidden_size, cfg.intermediate_size, dtype,
                                                                 par)

    def forward(self, x, positions, meta, k_cache, v_cache, rope):
        a = self.attn(self.ops.rms_norm(x, self.input_norm, self.eps), positions, meta, k_cache, v_cache, rope)
        h, x = self.ops.add_rms_norm(self.par.all_reduce(a), x, self.post_norm, self.eps)
        return x + self.par.all_reduce(self.mlp(h))


class MTPBlock(nn.Module):
    """Multi-token-prediction block: fc(cat(norm(embed(t_{i+1})), norm(h_i))) -> one dense decoder layer.

    Its attention is a sliding-window layer with RoPE whose KV lives in one extra layer of the ring pool.
    """

    def __init__(self, ops: Ops, cfg: ModelConfig, dtype, par: Parallel = SINGLE):
        super().__init__()
        H = cfg.hidden_size
        self.ops, self.eps = ops, cfg.rms_norm_eps
        self.norm_embedding = _param(H, dtype=dtype)
        self.norm_hidden = _param(H, dtype=dtype)
        self.fc = _param(H, 2 * H, dtype=dtype)     # replicated under tensor parallelism
        self.layer = DecoderLayer(ops, cfg, sliding=True, sparse=False, dtype=dtype, par=par)
        self.norm = _param(H, dtype=dtype)

    def forward(self, next_embedding, hidden, positions, meta, k_cache, v_cache, rope):
        """next_embedding: embed(t_{i+1}) [T, H]; hidden: h_i [T, H]. Returns the final-normed output."""
        ops = self.ops
        x = torch.cat((ops.rms_norm(next_embedding, self.norm_embedding, self.eps),
                       ops.rms_norm(hidden, self.norm_hidden, self.eps)), dim=-1)
        x = self.layer(ops.linear(x, self.fc), positions, meta, k_cache, v_cache, rope)
        return ops.rms_norm(x, self.norm, self.eps)


class ExaoneMoeModel(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, dtype=torch.float32, with_mtp: bool = False, act_dtype=None,
                 par: Parallel = SINGLE):
        super().__init__()
        self.ops, self.cfg, self.par = ops, cfg, par
        # Weights are stored in `dtype`, activations computed in `act_dtype` (the same, except on CPU, where the
        # C++ kernels read bf16 weights and compute in fp32).
        self.act_dtype = act_dtype or dtype
        self.eps = cfg.rms_norm_eps
        # this rank's rows of the vocabulary (all of it without tensor parallelism); padding rows stay zero
        self.vocab_start, vocab_rows = par.vocab_shard(cfg.vocab_size) if par.size > 1 else (0, cfg.vocab_size)
        self.embed = _param(vocab_rows, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(ops, cfg, cfg.layer_types[i] == "sliding", cfg.mlp_types[i] == "sparse", dtype, par)
            for i in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, dtype=dtype)
        self.lm_head = self.embed if cfg.tie_word_embeddings else _param(vocab_rows, cfg.hidden_size, dtype=dtype)
        self._zero_vocab_padding()
        self.mtp = MTPBlock(ops, cfg, dtype, par) if with_mtp else None
        # pool index of each layer: sliding layers index the ring pool, global layers the paged pool
        self.pool_index = [cfg.sliding_layers.index(i) if t == "sliding" else cfg.full_layers.index(i)
                           for i, t in enumerate(cfg.layer_types)]
        self.rope = None

    def _zero_vocab_padding(self):
        if self.par.size > 1 and self.embed.device.type != "meta":
            self.embed.data.zero_()
            self.lm_head.data.zero_()

    def materialize(self, device, fp8_params: dict | None = None) -> None:
        """Give a model built on the meta device its storage on `device` (contents undefined until loaded):
        the parameters in `fp8_params` (parameter -> block columns) as FP8 with a scale grid (kernels/fp8.py;
        scales NaN until loaded, so one never loaded cannot pass for a real one), the others in their dtype."""
        fp8_params = fp8_params or {}
        made = {}
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:
                    block_k = fp8_params.get(p)
                    q = nn.Parameter(torch.empty(p.shape, dtype=p.dtype if block_k is None else fp8.FP8,
                                                 device=device), requires_grad=False)
                    if block_k is not None:
                        groups = (*p.shape[:-2], -(-p.shape[-2] // fp8.ROW_GROUP), -(-p.shape[-1] // block_k))
                        fp8.attach(q, torch.full(groups, float("nan"), device=device), block_k)
                    made[id(p)] = q
                module._parameters[name] = made[id(p)]
        self._zero_vocab_padding()

    def init_rope(self, max_positions: int, device):
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        self.rope = (freqs.cos(), freqs.sin())

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta: AttnMetadata, kv, before_compute=None) -> torch.Tensor:
        """Returns the final-normed hidden states [T, H] (the lm_head input; MTP drafts from them too).
        `before_compute` (optional) is called just before the decoder layers run (see AsyncEngine)."""
        x = self.embed_tokens(input_ids)
        if before_compute is not None:
            before_compute()
        for layer, idx in zip(self.layers, self.pool_index):
            pool = kv.ring if layer.sliding else kv.paged
            x = layer(x, positions, meta, pool.k[idx], pool.v[idx], self.rope)
        return self.ops.rms_norm(x, self.norm, self.eps)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.size == 1:
            return self.embed[ids].to(self.act_dtype)
        # each token's row lives on one rank: the others contribute zeros to the all-reduce (exact)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)].to(self.act_dtype) * mine[:, None]
        return self.par.all_reduce(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(hidden, self.lm_head).float()
        if self.par.size == 1:
            return logits
        return self.par.all_gather_last(logits)[:, :self.cfg.vocab_size]

    @torch.inference_mode()
    def mtp_forward(self, next_ids, hidden, positions, meta: AttnMetadata, kv) -> torch.Tensor:
        """Draft step at positions i: inputs t_{i+1} and h_i (final-normed hidden of the main model, or of the
        previous draft step when chaining). Returns the MTP's final-normed output, whose logits predict
        t_{i+2} and which is the `h` of the next chained step."""
        ring = len(self.cfg.sliding_layers)          # the ring pool's extra last layer
        return self.mtp(self.embed_tokens(next_ids), hidden, positions, meta, kv.ring.k[ring],
                        kv.ring.v[ring], self.rope)
