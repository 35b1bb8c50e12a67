"""Scripted checkpoints: real EXAONE-MoE checkpoints whose greedy output is a fixed text.

The model is a first-order chain over token ids. Embeddings are one-hot (hidden >= vocab) and every block
writes zero into the residual stream (zero `o_proj` and every `down_proj`; routers, norms and the other
projections stay random, so attention, the KV pools and MoE routing all still run). The final hidden state
is then a positive multiple of the current token's one-hot, and `lm_head[next, token] = 1` picks its
successor. Each script piece is one token (an added, non-special token when it is not one already), so
every token has exactly one successor; the last piece is followed by `<|endofturn|>`.

A script starts after the prompt's last token, so scripts are keyed by that token's text:
- THINKING: the default generation prompt ends `<|assistant|>\\n<think>\\n`, whose last token is `\\n`.
- NO_THINKING: with enable_thinking=False it ends `<think>\\n\\n</think>\\n\\n`; in the tiny vocab that
  also ends in the `\\n` token, so the key becomes an added token to make the two prompts end differently.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer

from exaserve.engine.tiny import EOS_ID, TAGS, make_tiny_checkpoint

THINKING = "\n"
NO_THINKING = "\n</think>\n\n"
TOOL_CALL_TURN = ('I should look up the weather.\n</think>\n\n'
                  '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call>')
ANSWER_TURN = "It is sunny in Seoul today."
DEFAULT_SCRIPTS = {THINKING: TOOL_CALL_TURN, NO_THINKING: ANSWER_TURN}

_TAG_SPLIT = re.compile("(" + "|".join(map(re.escape, TAGS)) + ")")


def split_pieces(text: str) -> list[str]:
    """One token per piece: the tags (`</think>`, `<tool_call>`, ...) alone, the text between them whole.

    Whitespace-only text joins the next piece (the last one when at the end): a lone `\\n\\n` token would
    also appear in prompts and could end one, which would clash with the NO_THINKING key.
    """
    pieces: list[str] = []
    pending = ""
    for part in filter(None, _TAG_SPLIT.split(text)):
        if part.isspace():
            pending += part
        else:
            pieces.append(pending + part)
            pending = ""
    if pending:
        if not pieces:
            raise ValueError("a script needs some non-whitespace text")
        pieces[-1] += pending
    return pieces


def make_scripted_checkpoint(
    path: str | Path, scripts: dict[str, str | list[str]] | None = None, *, hidden_size: int | None = None,
    with_mtp: bool = False, seed: int = 0,
) -> Path:
    """Write a float32 tiny-preset checkpoint (4 layers: dense layer 0, then MoE; sliding and global) to path.

    scripts maps the text of a prompt's last token (THINKING, NO_THINKING or any other text, which becomes an
    added token if it is not a single token) to the output that follows it: a string is cut by split_pieces,
    a list gives the pieces (one token each) itself. Greedy decoding of a prompt ending in that token yields
    exactly the script, then EOS. No token may occur twice across all keys and scripts (ValueError).
    hidden_size defaults to the vocab size (the least that allows one-hot embeddings). With with_mtp the MTP
    block drafts the true next-next token: fc passes the embedding half through and its block writes zero.
    """
    scripts = DEFAULT_SCRIPTS if scripts is None else scripts
    pieces = {key: split_pieces(s) if isinstance(s, str) else list(s) for key, s in scripts.items()}
    # This first checkpoint only supplies the tokenizer: the vocab, and so the hidden size, is known only
    # after the pieces are added; the second call below writes the weights at that size.
    out = make_tiny_checkpoint(path, preset="tiny", seed=seed, with_mtp=False)

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = dict.fromkeys([*pieces, *(p for script in pieces.values() for p in script)])
    new = [t for t in texts if len(tok.encode(t, add_special_tokens=False).ids) != 1]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    successor = _successors(tok, pieces)

    vocab = -(-tok.get_vocab_size() // 64) * 64
    hidden = hidden_size or vocab
    if hidden < vocab:
        raise ValueError(f"hidden_size {hidden} < vocab size {vocab}: one-hot embeddings need hidden >= vocab")
    make_tiny_checkpoint(out, preset="tiny", seed=seed, with_mtp=with_mtp, vocab_size=vocab, hidden_size=hidden)
    tok.save(str(out / "tokenizer.json"))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for t in new:
        config["added_tokens_decoder"][str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": False}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    weights = load_file(str(out / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(w)
    weights["model.embed_tokens.weight"] = torch.eye(vocab, hidden)
    lm_head = torch.zeros(vocab, hidden)
    for token, nxt in successor.items():
        lm_head[nxt, token] = 1.0  # the final norm scales the one-hot by ~sqrt(hidden): logit ~30 vs 0
    weights["lm_head.weight"] = lm_head
    if with_mtp:
        weights["mtp.fc.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _successors(tok: Tokenizer, pieces: dict[str, list[str]]) -> dict[int, int]:
    successor: dict[int, int] = {}
    for key, script in pieces.items():
        ids = []
        for piece in [key, *script]:
            (i,) = tok.encode(piece, add_special_tokens=False).ids
            if tok.decode([i], skip_special_tokens=False) != piece:
                raise ValueError(f"token {piece!r} decodes to {tok.decode([i])!r}; choose other pieces")
            if i in successor or i in ids or i == EOS_ID:
                raise ValueError(f"token {piece!r} occurs twice (or is EOS); give the scripts distinct pieces")
            ids.append(i)
        successor.update(zip(ids, [*ids[1:], EOS_ID]))
    return successor
