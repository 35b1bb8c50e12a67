"""Safetensors checkpoint loader (single file or sharded), one tensor at a time.

Parameters are allocated once on the target device; each on-disk tensor is read, checked and copied into
its place (a row range of a fused matrix, one expert of a stacked tensor), then dropped, so peak host memory
stays near the size of the final weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.model import DecoderLayer, ExaoneMoeModel, MoE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$|.*\.rotary_emb\..*")


class CheckpointError(ValueError):
    pass


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _layer_targets(prefix: str, layer: DecoderLayer, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """On-disk name -> the view of our parameter it fills."""
    a, nq, nkv, d = layer.attn, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    t = {
        f"{prefix}.input_layernorm.weight": layer.input_norm.data,
        f"{prefix}.post_attention_layernorm.weight": layer.post_norm.data,
        f"{prefix}.self_attn.q_proj.weight": a.qkv.data[:nq],
        f"{prefix}.self_attn.k_proj.weight": a.qkv.data[nq:nq + nkv],
        f"{prefix}.self_attn.v_proj.weight": a.qkv.data[nq + nkv:],
        f"{prefix}.self_attn.o_proj.weight": a.o.data,
        f"{prefix}.self_attn.q_norm.weight": a.q_norm.data,
        f"{prefix}.self_attn.k_norm.weight": a.k_norm.data,
    }
    mlp = layer.mlp
    if isinstance(mlp, MoE):
        t[f"{prefix}.mlp.gate.weight"] = mlp.router.data
        t[f"{prefix}.mlp.e_score_correction_bias"] = mlp.bias.data
        width = cfg.moe_intermediate_size
        for e in range(cfg.num_experts):
            t[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = mlp.w13.data[e, :width]
            t[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = mlp.w13.data[e, width:]
            t[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = mlp.w2.data[e]
        if mlp.shared is not None:
            t.update(_mlp_targets(f"{prefix}.mlp.shared_experts", mlp.shared))
    else:
        t.update(_mlp_targets(f"{prefix}.mlp", mlp))
    return t


def _mlp_targets(prefix, mlp) -> dict[str, torch.Tensor]:
    width = mlp.down.shape[1]
    return {f"{prefix}.gate_proj.weight": mlp.gate_up.data[:width],
            f"{prefix}.up_proj.weight": mlp.gate_up.data[width:],
            f"{prefix}.down_proj.weight": mlp.down.data}


def weight_targets(model: ExaoneMoeModel) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    t = {"model.embed_tokens.weight": model.embed.data, "model.norm.weight": model.norm.data}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = model.lm_head.data
    for i, layer in enumerate(model.layers):
        t.update(_layer_targets(f"model.layers.{i}", layer, cfg))
    if model.mtp is not None:
        m = model.mtp
        t.update({"mtp.pre_fc_norm_embedding.weight": m.norm_embedding.data,
                  "mtp.pre_fc_norm_hidden.weight": m.norm_hidden.data,
                  "mtp.fc.weight": m.fc.data, "mtp.norm.weight": m.norm.data})
        t.update(_layer_targets("mtp.layers.0", m.layer, cfg))
    return t


def load_model(path: str | Path, dtype="float32", device="cpu", cfg: ModelConfig | None = None) -> ExaoneMoeModel:
    path = Path(path)
    cfg = cfg or ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    files = checkpoint_files(path)
    with_mtp = any(name.startswith("mtp.") for name in files)
    with torch.device(device):
        model = ExaoneMoeModel(cfg, dtype=dtype, with_mtp=with_mtp)
    targets = weight_targets(model)
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        if name not in targets:
            if name in ignorable or IGNORABLE.match(name):
                continue
            raise CheckpointError(f"unexpected tensor {name!r} in {f.name}: it has no place in an exaone_moe model "
                                  f"with this config.json")
        by_file.setdefault(f, []).append(name)
    missing = sorted(set(targets) - set(files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in checkpoint {path}")

    for f, names in by_file.items():
        with safe_open(f, framework="pt") as sf:
            for name in names:
                dst = targets[name]
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != tuple(dst.shape):
                    raise CheckpointError(f"tensor {name!r} has shape {list(shape)} but the config needs "
                                          f"{list(dst.shape)}")
                dst.copy_(sf.get_tensor(name))
    return model
