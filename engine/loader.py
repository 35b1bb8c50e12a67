"""Safetensors checkpoint loader (single file or sharded), one tensor at a time.

Parameters are allocated once on the target device; each on-disk tensor is read straight into its place (a
row range of a fused matrix, one expert of a stacked tensor), through a temporary buffer only when the dtype
or device differs. Files are read with plain reads rather than mmap, so pages of the checkpoint never count
towards the process's resident memory: peak host memory stays near the size of the final weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from exaserve import kernels
from exaserve.engine.config import ModelConfig
from exaserve.engine.model import DecoderLayer, ExaoneMoeModel, MoE
from exaserve.kernels import Ops

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
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


class SafetensorsFile:
    """The header of one .safetensors file, and reads of single tensors into given memory."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read_into(self, f, name: str, dst: torch.Tensor) -> None:
        e = self.entries[name]
        dtype = ST_DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        direct = dst.dtype == dtype and dst.device.type == "cpu" and dst.is_contiguous()
        buf = dst if direct else torch.empty(dst.shape, dtype=dtype)
        if end - begin != buf.numel() * buf.element_size():
            raise CheckpointError(f"tensor {name!r}: {end - begin} bytes on disk do not match its shape")
        f.seek(self.data_start + begin)
        if f.readinto(memoryview(buf.view(-1).view(torch.uint8).numpy())) != end - begin:
            raise CheckpointError(f"tensor {name!r} is truncated in {self.path.name}")
        if not direct:
            dst.copy_(buf)


def checkpoint_files(path: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: SafetensorsFile(path / f) for f in set(weight_map.values())}
        return {name: files[f] for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    st = SafetensorsFile(single)
    return {name: st for name in st.entries}


def _layer_targets(prefix: str, layer: DecoderLayer, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """On-disk name -> the view of our parameter it fills."""
    a, nq, nkv = layer.attn, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
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


def load_model(path: str | Path, dtype="float32", device="cpu", cfg: ModelConfig | None = None,
               act_dtype=None, ops: Ops | None = None) -> ExaoneMoeModel:
    """Weights in `dtype`; activations in `act_dtype` (default: the same); ops: the kernel backend's op table
    (default: the torch path)."""
    path = Path(path)
    ops = ops or kernels.select("torch", device)
    cfg = cfg or ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    files = checkpoint_files(path)
    with_mtp = any(name.startswith("mtp.") for name in files)
    with torch.device(device):
        model = ExaoneMoeModel(ops, cfg, dtype=dtype, with_mtp=with_mtp, act_dtype=act_dtype)
    targets = weight_targets(model)
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()

    by_file: dict[SafetensorsFile, list[str]] = {}
    for name, st in files.items():
        if name not in targets:
            if name in ignorable or IGNORABLE.match(name):
                continue
            raise CheckpointError(f"unexpected tensor {name!r} in {st.path.name}: it has no place in an exaone_moe "
                                  f"model with this config.json")
        if st.shape(name) != tuple(targets[name].shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(st.shape(name))} but the config needs "
                                  f"{list(targets[name].shape)}")
        by_file.setdefault(st, []).append(name)
    missing = sorted(set(targets) - set(files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in checkpoint {path}")

    for st, names in by_file.items():
        with open(st.path, "rb") as f:
            for name in sorted(names, key=lambda n: st.entries[n]["data_offsets"][0]):
                st.read_into(f, name, targets[name])
    return model
