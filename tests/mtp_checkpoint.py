"""Checkpoints with an MTP block, for speculative decoding tests and benchmarks.

- `add_random_mtp(path)`: a random MTP block next to the weights of any checkpoint (transformers drops
  `mtp.*` on save, so it is added to the safetensors file afterwards). Its drafts are nearly always wrong.
- `make_chain_checkpoint(path, agree)`: a model whose next token depends only on the current one (a random
  cycle over the vocabulary: one-hot embeddings, every block writes zero into the residual stream, lm_head
  maps each token to its successor), with an MTP block that predicts the token after next correctly for a
  known fraction `agree` of tokens and wrongly for the rest.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.hf_reference import make_hf_checkpoint


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
