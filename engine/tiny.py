"""Deterministic random EXAONE-MoE checkpoints in Hugging Face layout, for tests and benchmarks.

The weights are random but not flat (wide init, non-zero router bias) so logits and routing differ per
token; the tokenizer is a byte-level BPE trained on engine/data/corpus.txt with the K-EXAONE special ids.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

DATA = Path(__file__).parent / "data"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endofturn|>"
ROLE_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|tool_declare|>"]
# Added but not special: they stay in decoded text so the reasoning and tool parsers can see them.
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool>", "</tool>", "<tool_result>", "</tool_result>"]
EOS_ID = 53
# The first EOS_ID + 1 ids; reserved fillers put EOS at the id K-EXAONE uses.
_HEAD = [PAD, BOS, *ROLE_MARKERS, *TAGS]
LOW_TOKENS = _HEAD + [f"<|reserved_{i}|>" for i in range(len(_HEAD), EOS_ID)] + [EOS]

PRESETS = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, sliding_window_pattern="LLLG", num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=16, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=10000.0,
    ),
    "bench": dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, sliding_window_pattern="LLLG",
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=128, intermediate_size=1536,
        moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4, max_position_embeddings=8192,
        rope_theta=1_000_000.0,
    ),
}
_TOKENIZER_SIZE = {"tiny": 1000, "bench": 32000}  # BPE target; the bench corpus runs out before 32000
_DEFAULT_DTYPE = {"tiny": "float32", "bench": "bfloat16"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_tiny_checkpoint(
    out_dir: str | Path, *, preset: str = "tiny", seed: int = 0, dtype: str | None = None, with_mtp: bool = True,
    **overrides,
) -> Path:
    """Write config, weights, tokenizer and chat template to out_dir; same arguments -> same bytes.

    dtype defaults to float32 for "tiny" and bfloat16 for "bench"; overrides replace config.json fields.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    dtype = dtype or _DEFAULT_DTYPE[preset]
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(_TOKENIZER_SIZE[preset])
    config = _config(preset, tokenizer.get_vocab_size(), with_mtp, dtype, overrides)
    if config["vocab_size"] < tokenizer.get_vocab_size():
        raise ValueError(f"vocab_size {config['vocab_size']} < the tokenizer's {tokenizer.get_vocab_size()} tokens")

    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(config))
    (out / "chat_template.jinja").write_bytes((DATA / "chat_template.jinja").read_bytes())
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": 1, "eos_token_id": [EOS_ID], "pad_token_id": 0, "do_sample": True, "temperature": 1.0,
        "top_p": 0.95,
    })
    save_file(_weights(config, _DTYPES[dtype], seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    _readable_like_the_rest(out / "model.safetensors")
    return out


def _train_tokenizer(size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=LOW_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((DATA / "corpus.txt").read_text(encoding="utf-8").split("\n\n"), trainer)
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    # The trainer registers every listed token as special; the tags must not be.
    spec = json.loads(tok.to_str())
    for token in spec["added_tokens"]:
        token["special"] = token["content"] not in TAGS
    return Tokenizer.from_str(json.dumps(spec))


def _config(preset: str, tokenizer_size: int, with_mtp: bool, dtype: str, overrides: dict) -> dict:
    p = {"vocab_size": -(-tokenizer_size // 64) * 64, **PRESETS[preset], **overrides}
    n, pattern = p["num_hidden_layers"], p["sliding_window_pattern"]
    if isinstance(pattern, int):
        pattern = "L" * (pattern - 1) + "G"
    layer_types = p.get("layer_types") or [
        "full_attention" if pattern[i % len(pattern)] == "G" else "sliding_attention" for i in range(n)
    ]
    first_dense = p.get("first_k_dense_replace", 1)
    mlp_layer_types = p.get("mlp_layer_types") or ["dense" if i < first_dense else "sparse" for i in range(n)]
    config = {
        "architectures": ["ExaoneMoeForCausalLM"],
        "model_type": "exaone_moe",
        "vocab_size": p["vocab_size"],
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "moe_intermediate_size": p["moe_intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": p["max_position_embeddings"],
        "sliding_window": p["sliding_window"],
        "sliding_window_pattern": p["sliding_window_pattern"],
        "layer_types": layer_types,
        "first_k_dense_replace": first_dense,
        "mlp_layer_types": mlp_layer_types,
        "num_experts": p["num_experts"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_group": 1,
        "topk_group": 1,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.pop("rope_theta")},
        "num_nextn_predict_layers": 1 if with_mtp else 0,
        "bos_token_id": 1,
        "eos_token_id": EOS_ID,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
    }
    # Overrides of fields set above (e.g. num_shared_experts, tie_word_embeddings) win too.
    config.update({k: v for k, v in overrides.items() if k != "rope_theta"})
    return config


def _weights(cfg: dict, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, d = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}

    # std 1.6/sqrt(fan_in) keeps every projection's output around unit scale with peaked, not flat, logits.
    def linear(name, rows, cols):
        tensors[name] = (torch.randn(rows, cols, generator=gen) * (1.6 / cols**0.5)).to(dtype)

    def norm(name, size):
        tensors[name] = (1.0 + 0.1 * torch.randn(size, generator=gen)).to(dtype)

    def mlp(prefix, width):
        linear(f"{prefix}.gate_proj.weight", width, h)
        linear(f"{prefix}.up_proj.weight", width, h)
        linear(f"{prefix}.down_proj.weight", h, width)

    def block(prefix, mlp_type):
        norm(f"{prefix}.input_layernorm.weight", h)
        for name, rows in (("q", nq * d), ("k", nkv * d), ("v", nkv * d)):
            linear(f"{prefix}.self_attn.{name}_proj.weight", rows, h)
        linear(f"{prefix}.self_attn.o_proj.weight", h, nq * d)
        norm(f"{prefix}.self_attn.q_norm.weight", d)
        norm(f"{prefix}.self_attn.k_norm.weight", d)
        norm(f"{prefix}.post_attention_layernorm.weight", h)
        if mlp_type == "dense":
            mlp(f"{prefix}.mlp", cfg["intermediate_size"])
            return
        e, width = cfg["num_experts"], cfg["moe_intermediate_size"]
        # The router stays fp32, as in the released checkpoint; its bias only changes which experts win.
        tensors[f"{prefix}.mlp.gate.weight"] = torch.randn(e, h, generator=gen) * (1.6 / h**0.5)
        tensors[f"{prefix}.mlp.e_score_correction_bias"] = 0.1 * torch.randn(e, generator=gen)
        for j in range(e):
            mlp(f"{prefix}.mlp.experts.{j}", width)
        mlp(f"{prefix}.mlp.shared_experts", width * cfg["num_shared_experts"])

    tensors["model.embed_tokens.weight"] = torch.randn(cfg["vocab_size"], h, generator=gen).to(dtype)
    for i, mlp_type in enumerate(cfg["mlp_layer_types"]):
        block(f"model.layers.{i}", mlp_type)
    norm("model.norm.weight", h)
    if not cfg["tie_word_embeddings"]:
        linear("lm_head.weight", cfg["vocab_size"], h)
    if cfg["num_nextn_predict_layers"]:
        norm("mtp.pre_fc_norm_embedding.weight", h)
        norm("mtp.pre_fc_norm_hidden.weight", h)
        linear("mtp.fc.weight", h, 2 * h)
        block("mtp.layers.0", "dense")
        norm("mtp.norm.weight", h)
    return tensors


def _tokenizer_config(config: dict) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": t not in TAGS}
            for i, t in enumerate(LOW_TOKENS)
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _readable_like_the_rest(path: Path) -> None:
    """safetensors writes its files owner-only (0600); give this one the mode any new file gets here."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main_make_tiny(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="exaserve make-tiny", description="Write a random EXAONE-MoE checkpoint.")
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="default: float32 (tiny), bfloat16 (bench)")
    parser.add_argument("--no-mtp", action="store_true", help="leave out the MTP block")
    args = parser.parse_args(argv)
    out = make_tiny_checkpoint(args.dir, preset=args.preset, seed=args.seed, dtype=args.dtype, with_mtp=not args.no_mtp)
    print(out)
    return 0
