"""Block-FP8 checkpoints: the K-EXAONE-236B-A23B-FP8 release (compressed-tensors, `format: float-quantized`)
and the Hugging Face fine-grained FP8 layout (`quant_method: "fp8"`, `weight_block_size`).

Both store a quantized linear's `weight` as float8 e4m3 [out, in] beside an fp32 scale per block of
block[0] x block[1] weights (`weight_scale`, or `weight_scale_inv` in the Hugging Face layout; both multiply:
w = q * scale of its block), blocks at the edges partial. Modules on the format's ignore list stay unquantized
(compressed-tensors: exact names or `re:` patterns matched from the start; Hugging Face: names containing an
entry of `modules_to_not_convert`).

The loader keeps each FP8 weight as FP8 in memory with its scales (kernels/fp8.py: the layout every kernel
backend reads), or dequantizes it where that layout cannot hold it (engine/loader.py: _fp8_plan). Whether a
tensor is quantized is decided by its stored dtype and checked against the ignore list, so an unquantized
module (the MTP block, the router) can never be read as FP8 with made-up scales. `--quantization fp8`
quantizes a bf16/fp32 checkpoint at load the way the FP8 release was made (ONLINE, online_quantizable).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FP8_DTYPE = "F8_E4M3"     # safetensors' name of float8 e4m3


@dataclass(frozen=True)
class Fp8Format:
    method: str                    # "compressed-tensors" or "fp8"
    block: tuple[int, int]         # (rows, columns) of weights per scale
    ignore: tuple[str, ...]
    scale_suffix: str              # "weight_scale" or "weight_scale_inv"

    def ignored(self, module: str) -> bool:
        """Whether the format leaves `module` (e.g. "model.layers.1.mlp.gate") unquantized."""
        if self.method == "fp8":
            return any(entry in module for entry in self.ignore)
        return any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module
                   for entry in self.ignore)


def read_format(config: dict) -> Fp8Format | None:
    """The checkpoint's FP8 format from config.json, None without `quantization_config`; ValueError for a
    quantization exaserve cannot read."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        if qc.get("format") != "float-quantized":
            raise ValueError(f"compressed-tensors format {qc.get('format')!r} is not supported; exaserve reads "
                             f"'float-quantized' (block FP8)")
        blocks = set()
        for name, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if (w.get("type"), w.get("num_bits"), w.get("strategy")) != ("float", 8, "block"):
                raise ValueError(f"compressed-tensors group {name!r}: weights {w} are not block FP8 "
                                 f"(type float, num_bits 8, strategy block)")
            blocks.add(tuple(w.get("block_structure") or (128, 128)))
        if len(blocks) != 1:
            raise ValueError(f"compressed-tensors config_groups give {len(blocks)} block shapes; exaserve needs one")
        return Fp8Format(method, _block(blocks.pop()), tuple(qc.get("ignore") or ()), "weight_scale")
    if method == "fp8":
        if not qc.get("weight_block_size"):
            raise ValueError("fp8 quantization without weight_block_size (per-tensor FP8) is not supported; "
                             "exaserve reads block FP8")
        return Fp8Format(method, _block(qc["weight_block_size"]), tuple(qc.get("modules_to_not_convert") or ()),
                         "weight_scale_inv")
    raise ValueError(f"quantization_config quant_method {method!r} is not supported; exaserve reads block FP8 "
                     f"(compressed-tensors float-quantized, or fp8 with weight_block_size)")


# --quantization fp8: the release's 128 x 128 blocks and its choice of modules (below)
ONLINE = Fp8Format("online", (128, 128), (), "")


def online_quantizable(name: str, shape) -> bool:
    """Whether --quantization fp8 quantizes checkpoint tensor `name`: the decoder layers' linear weights
    (q/k/v/o, the MLPs, the experts and the shared expert), as the FP8 release does; not the router
    (`mlp.gate`), the embeddings, the lm_head or the MTP block."""
    return len(shape) == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight")


def _block(value) -> tuple[int, int]:
    block = tuple(int(v) for v in value)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"FP8 block size {list(value)} is not [rows, columns]")
    return block


def scale_shape(weight_shape, block: tuple[int, int]) -> tuple[int, int]:
    out, inp = weight_shape
    return -(-out // block[0]), -(-inp // block[1])


def dequantize_(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], row0: int = 0, col0: int = 0):
    """w: FP8 values already widened to fp32, the slice [row0:, col0:] of the stored weight; multiplied in
    place by the scale of each element's block."""
    rows = (torch.arange(w.shape[0]) + row0) // block[0]
    cols = (torch.arange(w.shape[1]) + col0) // block[1]
    return w.mul_(scale.index_select(0, rows).index_select(1, cols))
