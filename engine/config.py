"""Configuration: `EngineConfig` (every engine knob, validated) and `ModelConfig` (an `exaone_moe` checkpoint's
config.json + generation_config.json)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exaserve import kernels


class ConfigError(ValueError):
    pass


DTYPES = ("auto", "bfloat16", "float16", "float32")
KERNEL_BACKENDS = ("auto", *kernels.BACKENDS)
MAX_SPECULATIVE_TOKENS = 4


@dataclass
class EngineConfig:
    """Every engine knob, validated on construction. The CLI builds one from its flags; `LLM(model, **kw)` and
    `AsyncEngine(model, **kw)` from their keyword arguments (the same names)."""
    model: str
    dtype: str = "auto"                  # weights and KV cache; auto: the checkpoint's (on a CPU: see EngineCore)
    device: str = "auto"                 # auto: cuda when available, else cpu
    kernels: str | None = None           # kernel backend; None: $EXASERVE_KERNELS, else auto (exaserve.kernels)
    enforce_eager: bool = False          # no CUDA graphs for decode steps (engine/cuda_graph.py)
    max_model_len: int | None = None     # longest prompt + output; None: the model's max_position_embeddings
    max_num_seqs: int = 64               # requests in one batch
    max_num_batched_tokens: int = 2048   # tokens in one step
    kv_cache_memory: int | None = None   # bytes for both KV pools; None: from gpu_memory_utilization, 2 GiB on a CPU
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory for weights + KV pools (kv_cache_memory unset)
    block_size: int = 16                 # tokens per block of the paged (global-layer) pool
    num_speculative_tokens: int = 0      # MTP draft tokens per step, 0 = off
    spec_max_batch_size: int = 32        # no drafting in steps with more running requests than this
    enable_prefix_caching: bool = True   # reuse the KV of cached prompt prefixes (engine/kv_cache.py)
    tensor_parallel_size: int = 1        # ranks the model is split over (engine/parallel.py, engine/distributed.py)
    enable_expert_parallel: bool = False  # with tensor_parallel_size > 1: whole experts per rank instead of slices
    quantization: str | None = None      # "fp8": block-FP8 linear weights quantized at load (engine/loader.py)
    nnodes: int = 1                      # nodes the ranks are spread over (tensor_parallel_size / nnodes each)
    node_rank: int = 0                   # this node; 0 runs the engine (and the server), others only ranks
    master_addr: str = "127.0.0.1"       # node 0's address, where the ranks meet
    master_port: int | None = None       # node 0's port for that; None: a free one (one node only)

    def __post_init__(self):
        self.model = str(self.model)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                device = None
            if device is None or device.type not in ("cpu", "cuda"):
                raise ConfigError(f"device={self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"quantization={self.quantization!r}; exaserve supports fp8 (block FP8) or none")
        if self.kernels is not None and self.kernels not in KERNEL_BACKENDS:
            raise ConfigError(f"kernels={self.kernels!r}; use one of {', '.join(KERNEL_BACKENDS)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "spec_max_batch_size",
                     "tensor_parallel_size"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("max_model_len", "kv_cache_memory"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        _check_int("num_speculative_tokens", self.num_speculative_tokens, low=0, high=MAX_SPECULATIVE_TOKENS)
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float)) \
                or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _check_int("nnodes", self.nnodes, low=1)
        _check_int("node_rank", self.node_rank, low=0, high=self.nnodes - 1)
        if self.tensor_parallel_size % self.nnodes:
            raise ConfigError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of nnodes "
                              f"({self.nnodes}): each node runs the same number of ranks")
        if self.master_port is not None:
            _check_int("master_port", self.master_port, low=1, high=65535)
        elif self.nnodes > 1:
            raise ConfigError("nnodes > 1 needs master_port (and master_addr): where the nodes' ranks meet")
        for name in ("enable_expert_parallel", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, model: "str | Path | EngineConfig", options: dict) -> "EngineConfig":
        """An EngineConfig as given, or built from a checkpoint path and keyword options."""
        if isinstance(model, EngineConfig):
            if options:
                raise TypeError(f"options {sorted(options)} given beside an EngineConfig; set them in the config")
            return model
        return cls(model, **options)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must be {low}..{high}, got {value}" if high is not None
                          else f"{name} must be >= {low}, got {value}")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: list[str]          # "sliding" | "full" per layer
    mlp_types: list[str]            # "dense" | "sparse" per layer
    sliding_window: int | None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    num_experts: int = 0
    top_k: int = 0
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    num_mtp_layers: int = 0
    bos_token_id: int | None = 1
    pad_token_id: int | None = 0
    eos_token_ids: list[int] = field(default_factory=list)
    generation_defaults: dict = field(default_factory=dict)
    checkpoint_dtype: str = "float32"   # what "auto" loads: float32 | bfloat16 | float16

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "sliding"]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full"]

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if d.get("model_type") != "exaone_moe":
            raise ConfigError(f"model_type is {d.get('model_type')!r}; exaserve serves only 'exaone_moe' checkpoints")
        try:
            n_layers = int(d["num_hidden_layers"])
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            kv_heads = int(d.get("num_key_value_heads") or heads)
            vocab = int(d["vocab_size"])
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        head_dim = int(d.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv_heads})")

        window = d.get("sliding_window")
        layer_types = _layer_types(d, n_layers, window)
        if "sliding" in layer_types and not window:
            raise ConfigError("layer_types has sliding layers but sliding_window is not set")

        mlp_types = d.get("mlp_layer_types")
        if mlp_types is None:
            k = int(d.get("first_k_dense_replace", 1))
            mlp_types = ["dense" if i < k else "sparse" for i in range(n_layers)]
        if len(mlp_types) != n_layers or set(mlp_types) - {"dense", "sparse"}:
            raise ConfigError(f"mlp_layer_types must list 'dense'/'sparse' for each of {n_layers} layers: {mlp_types}")

        num_experts = int(d.get("num_experts") or 0)
        top_k = int(d.get("num_experts_per_tok") or 0)
        n_group, topk_group = int(d.get("n_group") or 1), int(d.get("topk_group") or 1)
        if "sparse" in mlp_types:
            if num_experts < 1 or not 1 <= top_k <= num_experts:
                raise ConfigError(f"MoE layers need 1 <= num_experts_per_tok ({top_k}) <= num_experts ({num_experts})")
            if num_experts % n_group or not 1 <= topk_group <= n_group:
                raise ConfigError(f"invalid expert groups: n_group={n_group}, topk_group={topk_group}, "
                                  f"num_experts={num_experts}")

        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"unsupported rope_type {rope_type!r} (only the default RoPE is implemented)")

        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(d.get("intermediate_size", 0)),
            moe_intermediate_size=int(d.get("moe_intermediate_size", 0)), num_layers=n_layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, layer_types=layer_types, mlp_types=list(mlp_types),
            sliding_window=int(window) if window else None, rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)), num_experts=num_experts,
            top_k=top_k, num_shared_experts=int(d.get("num_shared_experts", 1) or 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), n_group=n_group,
            topk_group=topk_group, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_theta=rope_theta, num_mtp_layers=int(d.get("num_nextn_predict_layers", 0) or 0),
            bos_token_id=d.get("bos_token_id"), pad_token_id=d.get("pad_token_id"), eos_token_ids=eos_ids,
            checkpoint_dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(
                str(d.get("dtype") or d.get("torch_dtype")), "float32"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"no config.json in {path}")
        cfg = cls.from_dict(json.loads(cfg_file.read_text()))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = json.loads(gen_file.read_text())
            eos = gen.get("eos_token_id")
            extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            cfg.eos_token_ids += [int(e) for e in extra if int(e) not in cfg.eos_token_ids]
            cfg.generation_defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p",
                                                           "repetition_penalty", "presence_penalty",
                                                           "frequency_penalty") if gen.get(k) is not None}
        return cfg


def _layer_types(d: dict, n_layers: int, window) -> list[str]:
    names = {"sliding_attention": "sliding", "full_attention": "full", "sliding": "sliding", "full": "full"}
    explicit = d.get("layer_types")
    if explicit is not None:
        if len(explicit) != n_layers or any(t not in names for t in explicit):
            raise ConfigError(f"layer_types must name sliding_attention/full_attention for each of {n_layers} "
                              f"layers: {explicit}")
        return [names[t] for t in explicit]
    pattern = d.get("sliding_window_pattern")
    if not window or pattern is None or pattern == 0:
        return ["full"] * n_layers
    if isinstance(pattern, str):
        if not pattern or set(pattern) - {"L", "G"}:
            raise ConfigError(f"sliding_window_pattern string must use only 'L' and 'G': {pattern!r}")
        return ["sliding" if pattern[i % len(pattern)] == "L" else "full" for i in range(n_layers)]
    p = int(pattern)
    return ["sliding" if (i + 1) % p else "full" for i in range(n_layers)]
