"""Incremental detokenization and stop-string matching for one request."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Keeps `text` equal to the decoded output so far, decoding only a short tail per token.

    Byte-level BPE can split one character over several tokens; a tail that decodes to a trailing U+FFFD is
    held until the character completes. With stop strings, the last len(longest stop) - 1 characters are
    held back from deltas until they cannot begin a stop string.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool, stop: list[str] | None,
                 include_stop_str_in_output: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0        # ids[prefix:read] decode to text already emitted into self.text
        self.read = 0
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the matched stop string if the text now contains one (text cut there)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if after.endswith("\ufffd"):
            return None
        new = after[len(before):]
        # advance even when the tokens made no text (skipped specials): the decoded tail stays short
        self.prefix, self.read = self.read, len(self.ids)
        if not new:
            return None
        start = max(0, len(self.text) - self.holdback)
        self.text += new
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.text = self.text[: i + len(s) if self.include_stop else i]
        return s

    def delta(self, finished: bool) -> str:
        end = len(self.text) if finished or not self.stop else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
