"""Random tiny EXAONE-MoE checkpoints built with transformers, and its model as the numerical reference."""
from __future__ import annotations

import torch


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
