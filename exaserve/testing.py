"""Checkpoints for tests and benchmarks, and transformers' model as the numerical reference.

- `make_hf_checkpoint(path, **config)`: a random tiny ExaoneMoeForCausalLM saved with transformers (weights
  wide enough that routing and logits are not flat), with a word-level tokenizer; `hf_greedy` decodes it.
- `add_random_mtp(path)`: a random MTP block next to the weights of any checkpoint (transformers drops
  `mtp.*` on save, so it is added to the safetensors file afterwards). Its drafts are nearly always wrong.
- `make_chain_checkpoint(path, agree)`: a model whose next token depends only on the current one (a random
  cycle over the vocabulary: one-hot embeddings, every block writes zero into the residual stream, lm_head
  maps each token to its successor), with an MTP block that predicts the token after next correctly for a
  known fraction `agree` of tokens and wrongly for the rest.

transformers is a test dependency (`pip install exaserve[test]`); it is imported only when a checkpoint is made.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exaserve.kernels import fp8


def make_hf_checkpoint(path, *, seed=0, std=0.2, **overrides):
    """save_pretrained a random ExaoneMoeForCausalLM with weights large enough that routing and logits are
    not flat, and a non-zero correction bias. Returns the transformers model (float32, eval)."""
    from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
              layer_types=["sliding_attention"] * 3 + ["full_attention"], num_experts=8, num_experts_per_tok=2,
              first_k_dense_replace=1, max_position_embeddings=512,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=None)
    kw.update(overrides)
    cfg = ExaoneMoeConfig(**kw)
    torch.manual_seed(seed)
    model = ExaoneMoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.1 * torch.randn_like(m.e_score_correction_bias))
    model.save_pretrained(path)
    write_word_tokenizer(path, cfg.vocab_size)
    return model


def write_word_tokenizer(path, vocab_size: int):
    """A word-level tokenizer.json ("t0".."tN", space separated) so the engine can detokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    tok.save(str(path / "tokenizer.json"))


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards (no cache): the plainest possible reference.
    Returns the tokens and each token's log_softmax logprob."""
    ids = list(prompt)
    out, lps = [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        t = int(torch.argmax(logits))
        out.append(t)
        lps.append(float(lp[t]))
        ids.append(t)
    return out, lps

def _mtp_tensors(cfg: dict, tensors: dict, gen: torch.Generator, std: float = 0.2) -> dict:
    """Random mtp.* tensors shaped after the main model's layer 0 (dense), norms near 1."""
    H = cfg["hidden_size"]
    out = {"mtp.fc.weight": torch.randn(H, 2 * H, generator=gen) * std}
    for name in ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"):
        out[name] = 1.0 + 0.1 * torch.randn(H, generator=gen)
    for name, t in tensors.items():
        if name.startswith("model.layers.0."):
            norm = "norm" in name.rsplit(".", 2)[-2]
            out["mtp.layers.0." + name[len("model.layers.0."):]] = (
                1.0 + 0.1 * torch.randn(t.shape, generator=gen) if norm else torch.randn(t.shape, generator=gen) * std)
    return out


def rewrite_checkpoint(src: str | Path, dst: str | Path, edit) -> Path:
    """A copy of the single-file checkpoint `src` at `dst` whose tensors `edit(tensors)` changed in place."""
    import shutil
    dst = Path(dst)
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def add_random_mtp(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tensors.update(_mtp_tensors(cfg, tensors, gen))
    save_file(tensors, path / "model.safetensors")
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def make_chain_checkpoint(path: str | Path, *, vocab: int = 64, agree: float = 1.0, seed: int = 0,
                          **overrides) -> tuple[Path, list[int]]:
    """Returns (path, successor) where successor[t] is the model's greedy next token after t."""
    path = Path(path)
    make_hf_checkpoint(path, seed=seed, vocab_size=vocab, hidden_size=vocab, **overrides)
    add_random_mtp(path, seed)
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab, generator=gen).tolist()
    successor = [0] * vocab
    for a, b in zip(order, order[1:] + order[:1]):
        successor[a] = b
    eye = torch.eye(vocab)
    tensors["model.embed_tokens.weight"] = eye.clone()
    lm_head = torch.zeros(vocab, vocab)
    for t, nxt in enumerate(successor):
        lm_head[nxt, t] = 1.0
    tensors["lm_head.weight"] = lm_head
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
        if name.endswith("norm.weight") and not name.startswith("mtp.layers"):
            tensors[name] = torch.ones_like(tensors[name])
    # MTP: fc passes the embedding of t_{i+1} through (optionally through a wrong token for some tokens),
    # so lm_head gives successor(t_{i+1}) = t_{i+2} exactly where it should agree.
    n_agree = round(agree * vocab)
    target = list(range(vocab))
    wrong = torch.randperm(vocab, generator=gen).tolist()
    for t in torch.randperm(vocab, generator=gen).tolist()[n_agree:]:
        target[t] = wrong[t] if wrong[t] != t else (t + 1) % vocab
    fc = torch.zeros(vocab, 2 * vocab)
    for t, u in enumerate(target):
        fc[u, t] = 1.0
    tensors["mtp.fc.weight"] = fc
    save_file(tensors, path / "model.safetensors")
    return path, successor


# Formats of quantize_fp8: config.json's quantization_config and the scale tensors' suffix. The ignore lists name
# what the released FP8 checkpoint leaves unquantized (router, lm_head, embeddings, MTP block).
FP8_FORMATS = {
    "compressed-tensors": ("weight_scale", lambda block: {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"type": "float", "num_bits": 8, "strategy": "block",
                                                  "block_structure": list(block)},
                                      "input_activations": {"type": "float", "num_bits": 8, "strategy": "group",
                                                            "group_size": 128, "dynamic": True}}},
        "ignore": ["lm_head", "model.embed_tokens", r"re:.*mlp\.gate$", r"re:mtp\..*"]}),
    "fp8": ("weight_scale_inv", lambda block: {
        "quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic",
        "modules_to_not_convert": ["lm_head", "embed_tokens", "mtp."]}),
}


def quantize_fp8(src: str | Path, dst: str | Path, dequantized: str | Path, *, fmt: str = "compressed-tensors",
                 block: tuple[int, int] = (128, 128)) -> None:
    """Write `dst`, the checkpoint at `src` with every linear weight (2-D `*_proj.weight`, mtp excepted) quantized
    to float8 e4m3 with one fp32 scale per `block` (edges partial), in `fmt`; and `dequantized`, the same
    checkpoint with those weights dequantized to fp32 (what an FP8 checkpoint must compute like)."""
    import shutil
    src, dst, deq = Path(src), Path(dst), Path(dequantized)
    suffix, qconfig = FP8_FORMATS[fmt]
    tensors = load_file(src / "model.safetensors")
    quantized, plain = {}, {}
    for name, w in tensors.items():
        if w.dim() == 2 and name.endswith("_proj.weight") and not name.startswith("mtp."):
            q, scale = fp8.quantize_blocks(w, block)
            quantized[name], quantized[name.removesuffix("weight") + suffix] = q, scale
            plain[name] = q.float() * scale.repeat_interleave(block[0], 0)[:w.shape[0]].repeat_interleave(
                block[1], 1)[:, :w.shape[1]]
        else:
            quantized[name] = plain[name] = w
    for out, state, extra in ((dst, quantized, {"quantization_config": qconfig(block)}), (deq, plain, {})):
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, out / f.name)
        cfg = json.loads((src / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **extra}))
        save_file(state, out / "model.safetensors")
