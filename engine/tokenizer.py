"""The checkpoint's tokenizer: `tokenizers` plus the settings Hugging Face keeps beside tokenizer.json."""

import json
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers.processors import TemplateProcessing


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    # tokenizer_config.json writes a token either as a string or as a serialised AddedToken.
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, backend: _Backend, config: dict, chat_template: str | None, model_eos: int | None = None):
        self._tok = backend
        self.chat_template = chat_template
        self.added_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        # tokenizer_config.json has the last word on which added tokens are special, as in transformers.
        for i, spec in config.get("added_tokens_decoder", {}).items():
            (special.add if spec.get("special") else special.discard)(int(i))
        self.special_ids = special
        self.bos_token_id = self._id_of(config.get("bos_token"))
        self.pad_token_id = self._id_of(config.get("pad_token"))
        eos = self._id_of(config.get("eos_token"))
        self.eos_token_id = eos if eos is not None else model_eos
        self._set_post_processor(config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # Only used when tokenizer_config.json names no eos_token.
        eos = _read_json(path / "generation_config.json").get("eos_token_id")
        eos = eos if eos is not None else _read_json(path / "config.json").get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}: exaserve reads the fast-tokenizer file that "
                                    f"Hugging Face checkpoints ship (save one with tokenizer.save_pretrained)")
        return cls(_Backend.from_file(str(tokenizer_file)), config, template, eos)

    def _id_of(self, token) -> int | None:
        token = _content(token)
        return None if token is None else self._tok.token_to_id(token)

    def _set_post_processor(self, config: dict) -> None:
        # transformers rebuilds the post-processor from add_bos_token/add_eos_token when either is set
        # (or when tokenizer.json has none); otherwise tokenizer.json's own post-processor decides.
        if "add_bos_token" not in config and "add_eos_token" not in config and self._tok.post_processor is not None:
            return
        bos = self.bos_token_id if config.get("add_bos_token") else None
        eos = self.eos_token_id if config.get("add_eos_token") else None
        ends = [(self.id_to_token(i), i) for i in (bos, eos) if i is not None]
        single = ([ends[0][0]] if bos is not None else []) + ["$A"] + ([ends[-1][0]] if eos is not None else [])
        self._tok.post_processor = TemplateProcessing(single=" ".join(single), special_tokens=ends)

    @property
    def backend(self) -> _Backend:
        """The `tokenizers.Tokenizer` underneath (offsets, batch encodes that release the GIL)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Without holding the GIL while the Rust tokenizer runs (its encode holds it, encode_batch does not): a
        long prompt encoded in a worker thread leaves the server's event loop free (measured on 2 MB of text,
        3.4 s to encode: encode_batch holds the GIL for 60 ms of it)."""
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)
