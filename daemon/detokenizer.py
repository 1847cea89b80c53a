"""Incremental detokenisation and stop-string matching for streamed generations.

Token ids arrive a few at a time; text must go out as deltas that never split a UTF-8 character
(byte-level BPE tokens can hold part of one) and never contain text a stop string will later cut.

`IncrementalDetokenizer` wraps the tokenizers library's `DecodeStream` (the sliding-window method
in Rust: a token's text is released once the window's text grows without ending in U+FFFD, an
incomplete character), primed with the last few prompt ids so tokenizers whose decoding depends on
the preceding token (SentencePiece's leading space) decode the first generated token in context.
Ids that have not produced text yet are kept here, so `flush()` can emit them at the end (partial
characters as U+FFFD): the deltas always add up to `decode(generated ids)`.

`StopStrings` finds the earliest stop string in not-yet-emitted text and says how much of its end
must be held back because it could still become a stop string. Emitted text never holds the start
of a match (that part was held back), so matches are searched in unsent text only.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from moed.daemon.tokenizer import TextTokenizer

PROMPT_CONTEXT = 5  # ids kept as decoding context: the prompt's last ones, then the last ones emitted


class IncrementalDetokenizer:
    __slots__ = ("_context", "_pending", "_skip", "_stream", "_tok")

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._context: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self._pending: list[int] = []  # ids not yet turned into text
        self._stream = DecodeStream(ids=self._context, skip_special_tokens=skip_special_tokens)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete ('' while a character is still partial)."""
        raw = self._tok.tokenizer
        out = []
        for t in new_ids:
            text = self._stream.step(raw, t)
            self._pending.append(t)
            if text is not None:
                out.append(text)
                self._context = (self._context + self._pending)[-PROMPT_CONTEXT:]
                self._pending = []
        return "".join(out)

    def flush(self) -> str:
        """Text of ids not yet emitted, incomplete characters as U+FFFD; call once at the end."""
        if not self._pending:
            return ""
        before = self._tok.decode(self._context, self._skip)
        text = self._tok.decode(self._context + self._pending, self._skip)
        self._context, self._pending = (self._context + self._pending)[-PROMPT_CONTEXT:], []
        return text[len(before) :] if len(text) > len(before) else ""


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """Earliest (index, stop string) with the match starting at or after `start`."""
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def holdback(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self.max_len - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
