"""Safetensors checkpoint loader (single file or sharded), one tensor at a time.

Parameters are allocated once on the target device; each on-disk tensor is read straight into its place (a
row range of a fused matrix, one expert of a stacked tensor), through a temporary buffer only when the dtype
or device differs. Files are read with plain reads rather than mmap, so pages of the checkpoint never count
towards the process's resident memory: peak host memory stays near the size of the final weights.

Under tensor parallelism each rank reads only its slice of a split tensor: a row range straight from the
file, a column range through a buffer of a few rows at a time, so no rank ever holds a whole split tensor.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from exaserve import kernels
from exaserve.engine import quantization as quantization_module
from exaserve.engine.config import ModelConfig
from exaserve.engine.model import MLP, DecoderLayer, ExaoneMoeModel, MoE
from exaserve.engine.parallel import SINGLE, Parallel
from exaserve.kernels import Ops, fp8

log = logging.getLogger("exaserve.engine")
ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$|.*\.rotary_emb\..*")
COLUMN_CHUNK_BYTES = 16 << 20   # buffer for reading a column slice, a few rows at a time


@dataclass
class Target:
    """Where an on-disk tensor goes: `dst`, a view of our parameter; with `dim`, only the slice
    [start, start + dst.shape[dim]) of the on-disk tensor's dimension `dim` (`full` long on disk). `param`:
    the linear weight `dst` is part of (those may be kept as FP8), None for any other tensor."""
    dst: torch.Tensor
    dim: int | None = None
    start: int = 0
    full: int = 0
    param: torch.Tensor | None = None

    @property
    def disk_shape(self) -> tuple[int, ...]:
        shape = list(self.dst.shape)
        if self.dim is not None:
            shape[self.dim] = self.full
        return tuple(shape)


def _sliced(dst: torch.Tensor, dim: int, start: int, full: int, param=None) -> Target:
    if start == 0 and full == dst.shape[dim]:
        return Target(dst, param=param)
    return Target(dst, dim, start, full, param)


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

    def read_into(self, f, name: str, dst: torch.Tensor, dim: int | None = None, start: int = 0) -> None:
        """Read tensor `name` into dst, or with `dim`, its slice [start, start + dst.shape[dim]) along dim."""
        e = self.entries[name]
        dtype = ST_DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        shape = e["shape"]
        if dim is not None:
            if end - begin != torch.Size(shape).numel() * dtype.itemsize:
                raise CheckpointError(f"tensor {name!r}: {end - begin} bytes on disk do not match its shape")
            row_bytes = torch.Size(shape[1:]).numel() * dtype.itemsize
            if dim == 0:  # a row range is contiguous on disk
                begin, end = begin + start * row_bytes, begin + (start + dst.shape[0]) * row_bytes
            elif 0 < dim < len(shape) and dst.shape[0] == shape[0]:
                return self._read_inner(f, name, dtype, begin, row_bytes, shape, dst, dim, start)
            else:
                raise CheckpointError(f"tensor {name!r}: cannot slice dimension {dim} of shape {shape}")
        direct = dst.dtype == dtype and dst.device.type == "cpu" and dst.is_contiguous()
        buf = dst if direct else torch.empty(dst.shape, dtype=dtype)
        if end - begin != buf.numel() * buf.element_size():
            raise CheckpointError(f"tensor {name!r}: {end - begin} bytes on disk do not match its shape")
        f.seek(self.data_start + begin)
        if f.readinto(memoryview(buf.view(-1).view(torch.uint8).numpy())) != end - begin:
            raise CheckpointError(f"tensor {name!r} is truncated in {self.path.name}")
        if not direct:
            dst.copy_(buf)

    def _read_inner(self, f, name, dtype, begin, row_bytes, shape, dst, dim, start) -> None:
        """A slice along dimension dim >= 1: the tensor is read a few dim-0 rows at a time, each narrowed."""
        rows = dst.shape[0]
        step = max(1, COLUMN_CHUNK_BYTES // row_bytes)
        buf = torch.empty(min(step, rows), *shape[1:], dtype=dtype)
        f.seek(self.data_start + begin)
        for r in range(0, rows, step):
            part = buf[:min(step, rows - r)]
            n = part.numel() * dtype.itemsize
            if f.readinto(memoryview(part.view(-1).view(torch.uint8).numpy())) != n:
                raise CheckpointError(f"tensor {name!r} is truncated in {self.path.name}")
            dst[r:r + part.shape[0]].copy_(part.narrow(dim, start, dst.shape[dim]))


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


def _layer_targets(prefix: str, layer: DecoderLayer, cfg: ModelConfig, par: Parallel, elsewhere: set[str],
                   stored: set[str]) -> dict[str, Target | list[Target]]:
    """On-disk name -> where it goes (a list where one stored tensor fills several places); names that belong
    to other ranks (expert parallel) go to `elsewhere`. `stored`: the checkpoint's names, which say whether the
    experts are stored one by one or stacked."""
    a, d = layer.attn, cfg.head_dim
    nq, nkv = a.nq * d, a.nkv * d                    # this rank's rows of q and of k (and of v)
    t = {
        f"{prefix}.input_layernorm.weight": Target(layer.input_norm.data),
        f"{prefix}.post_attention_layernorm.weight": Target(layer.post_norm.data),
        f"{prefix}.self_attn.q_proj.weight": _sliced(a.qkv.data[:nq], 0, par.rank * nq, cfg.num_heads * d, a.qkv),
        f"{prefix}.self_attn.k_proj.weight": _sliced(a.qkv.data[nq:nq + nkv], 0, a.first_kv_head * d,
                                                     cfg.num_kv_heads * d, a.qkv),
        f"{prefix}.self_attn.v_proj.weight": _sliced(a.qkv.data[nq + nkv:], 0, a.first_kv_head * d,
                                                     cfg.num_kv_heads * d, a.qkv),
        f"{prefix}.self_attn.o_proj.weight": _sliced(a.o.data, 1, par.rank * nq, cfg.num_heads * d, a.o),
        f"{prefix}.self_attn.q_norm.weight": Target(a.q_norm.data),
        f"{prefix}.self_attn.k_norm.weight": Target(a.k_norm.data),
    }
    mlp = layer.mlp
    if isinstance(mlp, MoE):
        t[f"{prefix}.mlp.gate.weight"] = Target(mlp.router.data)
        t[f"{prefix}.mlp.e_score_correction_bias"] = Target(mlp.bias.data)
        full, width = cfg.moe_intermediate_size, mlp.w2.shape[2]
        start = 0 if width == full else par.rank * width
        stacked = f"{prefix}.mlp.experts.gate_up_proj"
        if stacked in stored:   # re-saved checkpoints: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]
            if mlp.num_local_experts != cfg.num_experts:    # expert parallel: this rank's experts, whole
                first = mlp.first_expert
                t[stacked] = Target(mlp.w13.data, 0, first, cfg.num_experts, mlp.w13)
                t[f"{prefix}.mlp.experts.down_proj"] = Target(mlp.w2.data, 0, first, cfg.num_experts, mlp.w2)
            else:
                t[stacked] = [Target(mlp.w13.data[:, :width], 1, start, 2 * full, mlp.w13),
                              Target(mlp.w13.data[:, width:], 1, full + start, 2 * full, mlp.w13)]
                t[f"{prefix}.mlp.experts.down_proj"] = _sliced(mlp.w2.data, 2, start, full, mlp.w2)
            t.update(_mlp_targets(f"{prefix}.mlp.shared_experts", mlp.shared, par) if mlp.shared is not None else {})
            return t
        for e in range(cfg.num_experts):
            name = f"{prefix}.mlp.experts.{e}"
            local = e - mlp.first_expert
            if not 0 <= local < mlp.num_local_experts:
                elsewhere.update(f"{name}.{w}_proj.weight" for w in ("gate", "up", "down"))
                continue
            t[f"{name}.gate_proj.weight"] = _sliced(mlp.w13.data[local, :width], 0, start, full, mlp.w13)
            t[f"{name}.up_proj.weight"] = _sliced(mlp.w13.data[local, width:], 0, start, full, mlp.w13)
            t[f"{name}.down_proj.weight"] = _sliced(mlp.w2.data[local], 1, start, full, mlp.w2)
        if mlp.shared is not None:
            t.update(_mlp_targets(f"{prefix}.mlp.shared_experts", mlp.shared, par))
    else:
        t.update(_mlp_targets(f"{prefix}.mlp", mlp, par))
    return t


def _mlp_targets(prefix, mlp, par: Parallel) -> dict[str, Target]:
    width = mlp.down.shape[1]
    start, full = par.rank * width, par.size * width
    return {f"{prefix}.gate_proj.weight": _sliced(mlp.gate_up.data[:width], 0, start, full, mlp.gate_up),
            f"{prefix}.up_proj.weight": _sliced(mlp.gate_up.data[width:], 0, start, full, mlp.gate_up),
            f"{prefix}.down_proj.weight": _sliced(mlp.down.data, 1, start, full, mlp.down)}


def weight_targets(model: ExaoneMoeModel, stored: set[str] = frozenset()) -> tuple[dict, set[str]]:
    """(on-disk name -> where it goes on this rank (a Target, or a list of them), names that other ranks load);
    `stored`: the checkpoint's tensor names (its expert layout)."""
    cfg, par = model.cfg, model.par
    start = model.vocab_start
    rows = max(0, min(model.embed.shape[0], cfg.vocab_size - start))   # the last rank's shard may be padded

    def vocab(param):
        return _sliced(param.data[:rows], 0, start, cfg.vocab_size)

    elsewhere: set[str] = set()
    t = {"model.embed_tokens.weight": vocab(model.embed), "model.norm.weight": Target(model.norm.data)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = vocab(model.lm_head)
    for i, layer in enumerate(model.layers):
        t.update(_layer_targets(f"model.layers.{i}", layer, cfg, par, elsewhere, stored))
    if model.mtp is not None:
        m = model.mtp
        t.update({"mtp.pre_fc_norm_embedding.weight": Target(m.norm_embedding.data),
                  "mtp.pre_fc_norm_hidden.weight": Target(m.norm_hidden.data),
                  "mtp.fc.weight": Target(m.fc.data, param=m.fc), "mtp.norm.weight": Target(m.norm.data)})
        t.update(_layer_targets("mtp.layers.0", m.layer, cfg, par, elsewhere, stored))
    return t, elsewhere


def load_model(path: str | Path, dtype="float32", device="cpu", cfg: ModelConfig | None = None,
               act_dtype=None, ops: Ops | None = None, par: Parallel = SINGLE,
               quantization: str | None = None) -> ExaoneMoeModel:
    """Weights in `dtype`; activations in `act_dtype` (default: the same); ops: the kernel backend's op table
    (default: the torch path); par: this rank's share under tensor parallelism (default: everything).

    FP8: a block-FP8 checkpoint's linear weights stay FP8 in memory with their scales (kernels/fp8.py);
    `quantization="fp8"` quantizes a checkpoint's linear weights so at load (128 x 128 blocks, as the FP8
    release is made), except the router, embeddings, lm_head and the MTP block, which the release leaves
    unquantized. A weight whose layout cannot stay FP8 (see _fp8_plan) is dequantized instead (a checkpoint's)
    or left as it is (quantization="fp8"), and the log says which."""
    path = Path(path)
    ops = ops or kernels.select("torch", device)
    cfg = cfg or ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    if quantization not in (None, "fp8"):
        raise ValueError(f"unknown quantization {quantization!r}; exaserve supports fp8 (block FP8)")
    files = checkpoint_files(path)
    with_mtp = any(name.startswith("mtp.") for name in files)
    try:
        fmt = quantization_module.read_format(json.loads((path / "config.json").read_text()))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    # Planned on a model without storage: which linear weights stay FP8 decides each parameter's dtype.
    with torch.device("meta"):
        model = ExaoneMoeModel(ops, cfg, dtype=dtype, with_mtp=with_mtp, act_dtype=act_dtype, par=par)
    targets, elsewhere = weight_targets(model, set(files))
    scales = _fp8_scales(files, targets, fmt)   # weight name -> its scale's name, for the FP8 weights on disk
    online = set()
    if quantization == "fp8" and fmt is None:
        fmt = quantization_module.ONLINE
        online = {n for n in targets if quantization_module.online_quantizable(n, files[n].shape(n))}
    keep = _fp8_plan(model, targets, set(scales) | online, fmt) if fmt is not None else {}
    model.materialize(device, {p: fmt.block[1] for p in keep})
    targets, _ = weight_targets(model, set(files))
    _log_fp8(files, scales, online, keep, fmt, dtype)

    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    by_file: dict[SafetensorsFile, list[str]] = {}
    for name, st in files.items():
        if name not in targets:
            if name in elsewhere or name in ignorable or IGNORABLE.match(name) or name in scales.values():
                continue
            raise CheckpointError(f"unexpected tensor {name!r} in {st.path.name}: it has no place in an exaone_moe "
                                  f"model with this config.json")
        want = _each(targets[name])[0].disk_shape
        if st.shape(name) != want:
            raise CheckpointError(f"tensor {name!r} has shape {list(st.shape(name))} but the config needs "
                                  f"{list(want)}")
        by_file.setdefault(st, []).append(name)
    missing = sorted(set(targets) - set(files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in checkpoint {path}")

    for st, names in by_file.items():
        with open(st.path, "rb") as f:
            for name in sorted(names, key=lambda n: st.entries[n]["data_offsets"][0]):
                for target in _each(targets[name]):
                    kept = target.param is not None and fp8.parts(target.param) is not None
                    if name in scales:
                        _read_fp8(st, f, name, target, files[scales[name]], scales[name], fmt.block, kept)
                    elif kept:
                        _read_quantized(st, f, name, target, fmt.block)
                    else:
                        st.read_into(f, name, target.dst, target.dim, target.start)
    for name, target in targets.items():   # every scale was written: none is left as allocated (NaN)
        for t in _each(target):
            if t.param is not None and fp8.parts(t.param) is not None and not fp8.parts(t.param)[0].isfinite().all():
                raise CheckpointError(f"the FP8 weight {name!r} has scales that no checkpoint tensor filled")
    return model


def _fp8_plan(model: ExaoneMoeModel, targets: dict[str, Target | list[Target]], quantized: set[str],
              fmt: "quantization_module.Fp8Format") -> set:
    """The linear weights (parameters of the model being planned) that stay FP8: those whose every part comes
    from an FP8 tensor (or one quantized at load) and whose layout the kernels read (kernels/fp8.py): each part
    starts on a 32-row group of the parameter and fills whole groups (the last may end the parameter), the
    checkpoint's blocks are whole 32-row groups, and a tensor-parallel slice starts on a block boundary (a
    slice that cuts a block would need a scale for half of it). The others are logged by _log_fp8."""
    parts: dict[int, list[tuple[str, Target]]] = {}
    params = {}
    for name, target in targets.items():
        for t in _each(target):
            if t.param is not None:
                parts.setdefault(id(t.param), []).append((name, t))
                params[id(t.param)] = t.param
    keep = set()
    br, bk = fmt.block
    for pid, pieces in parts.items():
        p = params[pid]
        if br % fp8.ROW_GROUP or any(name not in quantized for name, _ in pieces):
            continue
        ok = True
        for _, t in pieces:
            r0, n = _rows_in_param(t.dst, p)
            if t.dst.dim() != 2 or r0 % fp8.ROW_GROUP or (n % fp8.ROW_GROUP and r0 + n != p.shape[-2]):
                ok = False
            if t.dim == 0 and t.start % br or t.dim == 1 and t.start % bk:
                ok = False
        if ok:
            keep.add(p)
    # The weights one kernel call reads together are all FP8 or none (the C++ MoE block takes one weight type):
    # an MLP's pair, and a MoE block's experts with its shared expert.
    for module in model.modules():
        if isinstance(module, MoE):
            group = [module.w13, module.w2, *(module.shared.parameters() if module.shared is not None else ())]
        elif isinstance(module, MLP):
            group = [module.gate_up, module.down]
        else:
            continue
        if not all(p in keep for p in group):
            keep.difference_update(group)
    return keep


def _rows_in_param(dst: torch.Tensor, param: torch.Tensor) -> tuple[int, int]:
    """(first row, rows) of a view of one matrix of `param` ([N, K] or a stack [E, N, K])."""
    N, K = param.shape[-2:]
    return (dst.storage_offset() - param.storage_offset()) % (N * K) // K, dst.shape[-2]


def _log_fp8(files, scales: dict[str, str], online: set[str], keep: set, fmt, dtype) -> None:
    if not scales and not online:
        return
    kept = sum(p.numel() for p in keep)
    total = sum(torch.Size(files[n].shape(n)).numel() for n in (scales.keys() | online))
    what = "FP8 checkpoint (%s)" % fmt.method if scales else "--quantization fp8 (quantized at load)"
    log.info("%s, %dx%d blocks: %.1f MiB of linear weights kept as FP8 in memory (%.0f%% of the %.1f MiB "
             "quantized)", what, *fmt.block, kept / (1 << 20), 100.0 * kept / max(total, 1), total / (1 << 20))
    if kept < total:
        log.warning("%.1f MiB of FP8-quantized weights are %s as %s: their fused parts or tensor-parallel "
                    "slices do not start on the block grid the FP8 kernels read (every published configuration "
                    "does; small test configurations may not)", (total - kept) / (1 << 20),
                    "dequantized" if scales else "kept", str(dtype).removeprefix("torch."))


def _each(target: Target | list[Target]) -> list[Target]:
    return target if isinstance(target, list) else [target]


def _fp8_scales(files: dict[str, SafetensorsFile], targets: dict[str, Target],
                fmt: "quantization_module.Fp8Format | None") -> dict[str, str]:
    """FP8 weight name -> its scale tensor's name; clear errors for an FP8 tensor without a format, on the ignore
    list, or with a missing or misshapen scale."""
    scales = {}
    for name, st in files.items():
        if st.entries[name]["dtype"] != quantization_module.FP8_DTYPE:
            continue
        module = name.removesuffix(".weight")
        if fmt is None:
            raise CheckpointError(f"tensor {name!r} is FP8 but config.json has no quantization_config")
        if name == module or name not in targets or len(st.shape(name)) != 2:
            raise CheckpointError(f"tensor {name!r} is FP8, which exaserve reads only for linear weights")
        if fmt.ignored(module):
            raise CheckpointError(f"tensor {name!r} is FP8 but its module is on the quantization ignore list")
        scale = f"{module}.{fmt.scale_suffix}"
        if scale not in files:
            raise CheckpointError(f"FP8 tensor {name!r} has no scale {scale!r} in the checkpoint")
        want = quantization_module.scale_shape(st.shape(name), fmt.block)
        if files[scale].shape(scale) != want or files[scale].entries[scale]["dtype"] not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"scale {scale!r} has shape {list(files[scale].shape(scale))} and dtype "
                                  f"{files[scale].entries[scale]['dtype']}; the {list(st.shape(name))} FP8 weight "
                                  f"in {list(fmt.block)} blocks needs {list(want)}, floating point")
        scales[name] = scale
    return scales


def _read_fp8(st: SafetensorsFile, f, name: str, target: Target, scale_file: SafetensorsFile, scale_name: str,
              block: tuple[int, int], kept: bool) -> None:
    """This rank's slice of an FP8 weight with its block scales: kept FP8 (the bytes as stored, the scales into
    the parameter's grid) or dequantized into the target's dtype."""
    scale = torch.empty(scale_file.shape(scale_name), dtype=torch.float32)
    with open(scale_file.path, "rb") as sf:
        scale_file.read_into(sf, scale_name, scale)
    if not torch.isfinite(scale).all():
        raise CheckpointError(f"scale {scale_name!r} holds values that are not finite")
    row0 = target.start if target.dim == 0 else 0
    col0 = target.start if target.dim == 1 else 0
    if kept:
        st.read_into(f, name, target.dst, target.dim, target.start)
        _put_scales(target, scale, block, row0, col0)
        return
    values = torch.empty(target.dst.shape, dtype=torch.float32)
    st.read_into(f, name, values, target.dim, target.start)            # e4m3 -> fp32 is exact
    target.dst.copy_(quantization_module.dequantize_(values, scale, block, row0, col0))


def _read_quantized(st: SafetensorsFile, f, name: str, target: Target, block: tuple[int, int]) -> None:
    """This rank's slice of a weight, quantized to FP8 in blocks (quantization="fp8"); the slice starts on a
    block boundary (_fp8_plan), so its blocks are the whole tensor's."""
    values = torch.empty(target.dst.shape, dtype=torch.float32)
    st.read_into(f, name, values, target.dim, target.start)
    q, scale = fp8.quantize_blocks(values, block)
    target.dst.copy_(q)
    _put_scales(target, scale, block, 0, 0)


def _put_scales(target: Target, grid: torch.Tensor, block: tuple[int, int], row0: int, col0: int) -> None:
    """Fill the scales of target.dst's rows in its parameter's grid (groups of 32 rows, kernels/fp8.py) from a
    block grid whose origin is the tensor's element (row0, col0) before slicing."""
    p = target.param
    scale, block_k = fp8.parts(p)
    r0, n = _rows_in_param(target.dst, p)
    groups = -(-n // fp8.ROW_GROUP)
    rows = (row0 + torch.arange(groups) * fp8.ROW_GROUP) // block[0]
    cols = col0 // block[1] + torch.arange(scale.shape[-1])
    dst = scale if p.dim() == 2 else scale[(target.dst.storage_offset() - p.storage_offset()) // p[0].numel()]
    dst[r0 // fp8.ROW_GROUP:r0 // fp8.ROW_GROUP + groups] = grid.index_select(0, rows).index_select(1, cols)
