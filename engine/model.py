"""EXAONE-MoE on one flat batch of tokens (no padding), attention through the two KV pools.

Parameter layout differs from the checkpoint where the kernels want it: q/k/v rows fused into `qkv`,
gate/up rows fused into `gate_up`, experts stacked into `w13 [E, 2I, H]` and `w2 [E, H, I]`
(engine/loader.py maps the on-disk names).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from exaserve import kernels
from exaserve.engine.config import ModelConfig

log = logging.getLogger("exaserve.model")


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
    def __init__(self, hidden: int, width: int, dtype):
        super().__init__()
        self.gate_up = _param(2 * width, hidden, dtype=dtype)
        self.down = _param(hidden, width, dtype=dtype)

    def forward(self, x):
        return kernels.mlp(x, self.gate_up, self.down)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        super().__init__()
        self.cfg = cfg
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = _param(E, H, dtype=torch.float32)
        self.bias = _param(E, dtype=torch.float32)
        self.w13 = _param(E, 2 * I, H, dtype=dtype)
        self.w2 = _param(E, H, I, dtype=dtype)
        self.shared = MLP(H, I * cfg.num_shared_experts, dtype) if cfg.num_shared_experts else None

    def forward(self, x):
        c = self.cfg
        weights, ids = kernels.moe_route(x, self.router, self.bias, c.top_k, c.n_group, c.topk_group,
                                         c.norm_topk_prob, c.routed_scaling_factor)
        shared = (None, None) if self.shared is None else (self.shared.gate_up, self.shared.down)
        return kernels.moe(x, self.w13, self.w2, weights, ids, *shared)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, dtype):
        super().__init__()
        self.nq, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
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
        T = x.shape[0]
        q, k, v = kernels.linear(x, self.qkv).split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q, k = kernels.qk_norm_rope(q.reshape(T, self.nq, self.d), k.reshape(T, self.nkv, self.d), self.q_norm,
                                    self.k_norm, self.eps, positions, *rope, self.use_rope)
        v = v.reshape(T, self.nkv, self.d)
        if self.sliding:
            # Attend first, then store: a chunk longer than ring_len - window would overwrite rows that its
            # own earlier queries still read.
            o = kernels.ring_attention(q, k, v, k_cache, v_cache, meta.ring_slots, meta.query_start_loc,
                                       meta.context_lens, self.window, self.scale)
            kernels.write_kv(k, v, k_cache, v_cache, meta.ring_mapping)
        else:
            kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            o = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                        meta.query_start_loc, self.scale)
        return kernels.linear(o.reshape(T, self.nq * self.d), self.o)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, sparse: bool, dtype, dense_width: int | None = None):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.sliding = sliding
        self.input_norm = _param(cfg.hidden_size, dtype=dtype)
        self.post_norm = _param(cfg.hidden_size, dtype=dtype)
        self.attn = Attention(cfg, sliding, dtype)
        self.mlp = MoE(cfg, dtype) if sparse else MLP(cfg.hidden_size, dense_width or cfg.intermediate_size, dtype)

    def forward(self, x, positions, meta, k_cache, v_cache, rope):
        a = self.attn(kernels.rms_norm(x, self.input_norm, self.eps), positions, meta, k_cache, v_cache, rope)
        h, x = kernels.add_rms_norm(a, x, self.post_norm, self.eps)
        return x + self.mlp(h)


class MTPBlock(nn.Module):
    """Multi-token-prediction block: fc(cat(norm(embed(t_{i+1})), norm(h_i))) -> one dense decoder layer.

    Its attention is a sliding-window layer with RoPE whose KV lives in one extra layer of the ring pool.
    """

    def __init__(self, cfg: ModelConfig, dtype):
        super().__init__()
        H = cfg.hidden_size
        self.norm_embedding = _param(H, dtype=dtype)
        self.norm_hidden = _param(H, dtype=dtype)
        self.fc = _param(H, 2 * H, dtype=dtype)
        self.layer = DecoderLayer(cfg, sliding=True, sparse=False, dtype=dtype)
        self.norm = _param(H, dtype=dtype)


class ExaoneMoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=torch.float32, with_mtp: bool = False, act_dtype=None):
        super().__init__()
        self.cfg = cfg
        # Weights are stored in `dtype`, activations computed in `act_dtype` (the same, except on CPU, where the
        # C++ kernels read bf16 weights and compute in fp32).
        self.act_dtype = act_dtype or dtype
        self.eps = cfg.rms_norm_eps
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg.layer_types[i] == "sliding", cfg.mlp_types[i] == "sparse", dtype)
            for i in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, dtype=dtype)
        self.lm_head = self.embed if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size,
                                                                         dtype=dtype)
        self.mtp = MTPBlock(cfg, dtype) if with_mtp else None
        # pool index of each layer: sliding layers index the ring pool, global layers the paged pool
        self.pool_index = [cfg.sliding_layers.index(i) if t == "sliding" else cfg.full_layers.index(i)
                           for i, t in enumerate(cfg.layer_types)]
        self.rope = None
        self._cpu_layers = None     # C++ decoder layers, once pack_for_cpu() has run
        self._argmax_screen = ()    # the lm_head's int8 argmax screen (kernels/cpu_ops.argmax_screen), if any

    def pack_for_cpu(self) -> None:
        """Reorder every GEMM weight into the C++ CPU kernels' packed layout (kernels/cpu_ops.py), once after
        loading. From then on only the C++ path can read them. A tied lm_head gets its own packed copy, since
        the embedding lookup needs plain rows."""
        cpu_ops = kernels.cpu_ops

        def pack_mlp(mlp):
            cpu_ops.pack_parameter(mlp.gate_up, mlp.gate_up.shape[0] // 2)
            cpu_ops.pack_parameter(mlp.down)

        def pack_layer(layer):
            cpu_ops.pack_parameter(layer.attn.qkv)
            cpu_ops.pack_parameter(layer.attn.o)
            if isinstance(layer.mlp, MoE):
                cpu_ops.pack_parameter(layer.mlp.w13, layer.mlp.w13.shape[1] // 2)
                cpu_ops.pack_parameter(layer.mlp.w2)
                if layer.mlp.shared is not None:
                    pack_mlp(layer.mlp.shared)
            else:
                pack_mlp(layer.mlp)

        for layer in self.layers:
            pack_layer(layer)
        self._cpu_layers = [self._cpu_layer(layer, idx) for layer, idx in zip(self.layers, self.pool_index)]
        self._cpu_probe = torch.empty(0, dtype=self.act_dtype)  # what kernels.backend() decides for activations
        if self.lm_head is self.embed:
            self.lm_head = nn.Parameter(self.embed.detach().clone(), requires_grad=False)
        # Greedy rows take their argmax through an int8 screen of the lm_head: the same tokens, about half the
        # lm_head's bytes per step. EXASERVE_ARGMAX_SCREEN=0 turns it off (A/B measurements).
        if os.environ.get("EXASERVE_ARGMAX_SCREEN", "1") != "0":
            try:
                self._argmax_screen = cpu_ops.argmax_screen(self.lm_head.data)
            except RuntimeError as e:  # weights it cannot bound (not finite, huge): every logit is computed
                log.warning("no argmax screen: %s", str(e).splitlines()[0])
        cpu_ops.pack_parameter(self.lm_head)
        if self.mtp is not None:
            cpu_ops.pack_parameter(self.mtp.fc)
            pack_layer(self.mtp.layer)

    def _cpu_layer(self, layer: "DecoderLayer", pool_index: int):
        c, mlp = self.cfg, layer.mlp
        if isinstance(mlp, MoE):
            weights = {"router": mlp.router, "bias": mlp.bias, "w13": mlp.w13, "w2": mlp.w2}
            if mlp.shared is not None:
                weights.update(shared_gate_up=mlp.shared.gate_up, shared_down=mlp.shared.down)
            route = dict(top_k=c.top_k, n_group=c.n_group, topk_group=c.topk_group,
                         norm_topk_prob=c.norm_topk_prob, scaling=c.routed_scaling_factor)
        else:
            weights, route = {"shared_gate_up": mlp.gate_up, "shared_down": mlp.down}, None
        return kernels.cpu_ops.make_layer(layer.input_norm, layer.post_norm, layer.attn, weights,
                                  window=layer.attn.window, pool_index=pool_index, route=route)

    def init_rope(self, max_positions: int, device):
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        self.rope = (freqs.cos(), freqs.sin())

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta: AttnMetadata, kv, before_compute=None) -> torch.Tensor:
        """Returns the final-normed hidden states [T, H] (the lm_head input; MTP drafts from them too).
        `before_compute` (optional) is called just before the decoder layers run (see AsyncEngine)."""
        x = self.embed[input_ids].to(self.act_dtype)
        if self._cpu_layers is not None and kernels.backend(x) == "cpu":   # all layers in one C++ call
            x = kernels.cpu_ops.forward_layers(self._cpu_layers, x, positions, meta, kv, self.rope, before_compute)
            return kernels.rms_norm(x, self.norm, self.eps)
        if before_compute is not None:
            before_compute()
        for layer, idx in zip(self.layers, self.pool_index):
            pool = kv.ring if layer.sliding else kv.paged
            x = layer(x, positions, meta, pool.k[idx], pool.v[idx], self.rope)
        return kernels.rms_norm(x, self.norm, self.eps)

    def rows_step(self, input_ids, positions, meta: AttnMetadata, kv, rows: torch.Tensor, argmax: bool,
                  before_compute=None) -> torch.Tensor | None:
        """The raw logits at hidden rows `rows` (int64), or with `argmax` their argmax tokens, the step computed
        in one C++ call; None where the C++ path does not run this model (then: forward + compute_logits)."""
        if self._cpu_layers is None or kernels.backend(self._cpu_probe) != "cpu":
            return None
        return kernels.cpu_ops.rows_step(self._cpu_layers, self.embed, input_ids, positions, meta, kv, self.rope,
                                         self.norm, self.eps, self.lm_head, rows, argmax, before_compute,
                                         self._argmax_screen)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return kernels.linear(hidden, self.lm_head).float()

    @torch.inference_mode()
    def mtp_forward(self, next_ids, hidden, positions, meta: AttnMetadata, kv) -> torch.Tensor:
        """Draft step at positions i: inputs t_{i+1} and h_i (final-normed hidden of the main model, or of the
        previous draft step when chaining). Returns the MTP's final-normed output, whose logits predict
        t_{i+2} and which is the `h` of the next chained step."""
        m = self.mtp
        x = torch.cat((kernels.rms_norm(self.embed[next_ids].to(self.act_dtype), m.norm_embedding, self.eps),
                       kernels.rms_norm(hidden, m.norm_hidden, self.eps)), dim=-1)
        x = kernels.linear(x, m.fc)
        ring = len(self.cfg.sliding_layers)          # the ring pool's extra last layer
        x = m.layer(x, positions, meta, kv.ring.k[ring], kv.ring.v[ring], self.rope)
        return kernels.rms_norm(x, m.norm, self.eps)
