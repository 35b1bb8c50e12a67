"""The C++ CPU fast path of a loaded ExaoneMoeModel, kept apart from the model (a post-load conversion, as
gpt-fast keeps its transforms apart from the model file).

`CpuModel(model)` reorders every GEMM weight of the model in place into the C++ kernels' packed layout
(kernels/cpu_ops.py; from then on only the cpu backend's ops can read them), builds one C++ decoder layer per
model layer over the same storage (kernels/cpu/layer.h, the fused twin of engine/model.py's DecoderLayer: a
change to one must be made in the other), and the lm_head's int8 argmax screen for greedy rows. Then a step's
decoder stack is one C++ call (`forward`), or the whole step from the embedding to the sampled rows' logits or
tokens (`rows_step`). The model's own forward keeps working on the packed weights through the cpu ops (MTP).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from exaserve.engine.model import MLP, AttnMetadata, DecoderLayer, ExaoneMoeModel, MoE
from exaserve.kernels import cpu_ops

log = logging.getLogger("exaserve.engine")


def _pack_mlp(mlp: MLP) -> None:
    cpu_ops.pack_parameter(mlp.gate_up, mlp.gate_up.shape[0] // 2)
    cpu_ops.pack_parameter(mlp.down)


def _pack_layer(layer: DecoderLayer) -> None:
    cpu_ops.pack_parameter(layer.attn.qkv)
    cpu_ops.pack_parameter(layer.attn.o)
    if isinstance(layer.mlp, MoE):
        cpu_ops.pack_parameter(layer.mlp.w13, layer.mlp.w13.shape[1] // 2)
        cpu_ops.pack_parameter(layer.mlp.w2)
        if layer.mlp.shared is not None:
            _pack_mlp(layer.mlp.shared)
    else:
        _pack_mlp(layer.mlp)


def _cpp_layer(model: ExaoneMoeModel, layer: DecoderLayer, pool_index: int):
    c, mlp = model.cfg, layer.mlp
    if isinstance(mlp, MoE):
        weights = {"router": mlp.router, "bias": mlp.bias, "w13": mlp.w13, "w2": mlp.w2}
        if mlp.shared is not None:
            weights.update(shared_gate_up=mlp.shared.gate_up, shared_down=mlp.shared.down)
        route = dict(top_k=c.top_k, n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                     scaling=c.routed_scaling_factor)
    else:
        weights, route = {"shared_gate_up": mlp.gate_up, "shared_down": mlp.down}, None
    return cpu_ops.make_layer(layer.input_norm, layer.post_norm, layer.attn, weights, window=layer.attn.window,
                              pool_index=pool_index, route=route)


def pack_weights(model: ExaoneMoeModel) -> None:
    """Every GEMM weight of the model into the C++ kernels' packed layout, in place. Alone (without CpuModel)
    for a model that runs layer by layer on the cpu ops: a tensor-parallel rank, whose layers all-reduce
    halfway, which the one-call layer stack cannot."""
    if model.ops.name != "cpu":
        raise ValueError(f"packed weights need a model built with the cpu kernel backend, not {model.ops.name!r}")
    for layer in model.layers:
        _pack_layer(layer)
    if model.lm_head is model.embed:  # tied: the embedding lookup needs plain rows, so the lm_head gets a copy
        model.lm_head = nn.Parameter(model.embed.detach().clone(), requires_grad=False)
    cpu_ops.pack_parameter(model.lm_head)
    if model.mtp is not None:
        cpu_ops.pack_parameter(model.mtp.fc)
        _pack_layer(model.mtp.layer)


class CpuModel:
    def __init__(self, model: ExaoneMoeModel, argmax_screen: bool = True):
        if model.ops.name != "cpu":
            raise ValueError(f"CpuModel needs a model built with the cpu kernel backend, not {model.ops.name!r}")
        self.model = model
        # Greedy rows take their argmax through an int8 screen of the lm_head: the same tokens, about half the
        # lm_head's bytes per step (EXASERVE_ARGMAX_SCREEN=0 turns it off, for A/B measurements). Built from
        # the plain rows, before they are packed.
        self.screen = ()
        if argmax_screen:
            try:
                self.screen = cpu_ops.argmax_screen(model.lm_head.data)
            except RuntimeError as e:  # weights it cannot bound (not finite, huge): every logit is computed
                log.warning("no argmax screen: %s", str(e).splitlines()[0])
        pack_weights(model)
        self.layers = [_cpp_layer(model, layer, idx) for layer, idx in zip(model.layers, model.pool_index)]

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta: AttnMetadata, kv, before_compute=None) -> torch.Tensor:
        """ExaoneMoeModel.forward with the decoder stack in one C++ call."""
        m = self.model
        x = m.embed[input_ids].to(m.act_dtype)
        x = cpu_ops.forward_layers(self.layers, x, positions, meta, kv, m.rope, before_compute)
        return cpu_ops.rms_norm(x, m.norm, m.eps)

    def rows_step(self, input_ids, positions, meta: AttnMetadata, kv, rows: torch.Tensor, argmax: bool,
                  before_compute=None, token_mask=None) -> torch.Tensor:
        """The raw logits at hidden rows `rows` (int64), or with `argmax` their argmax tokens (over the tokens
        `token_mask`, a grammar's bitmask of the rows, allows): the whole step in one C++ call."""
        m = self.model
        return cpu_ops.rows_step(self.layers, m.embed, input_ids, positions, meta, kv, m.rope, m.norm, m.eps,
                                 m.lm_head, rows, argmax, before_compute, self.screen, token_mask)
