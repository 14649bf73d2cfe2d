"""Incremental detokenization: each new token costs O(1) decoding work (tokenizers' DecodeStream,
which holds back bytes of a character split across tokens), never a re-decode of the response.
Stop strings are matched on the text as it grows; text past a stop string is never emitted, and
while a stop string could still be completing, its possible start is held back."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.stop = list(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._text = ""  # decoded so far (past a stop string: cut there)
        self._emitted = 0  # characters of _text already returned
        self.stopped = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=list(prompt_ids)[-8:], skip_special_tokens=True)
        # Recent ids: the first _prefix are decoded (context for the window decode of slow
        # tokenizers and of the final flush); the rest are a character still incomplete.
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids)[-8:]
        self._prefix = len(self._ids)

    @property
    def text(self) -> str:
        return self._text

    def _window_step(self, token: int, final: bool = False) -> str:
        """Decode a short window and emit what grew past its context (slow tokenizers, and the
        flush of a character never completed)."""
        if token >= 0:
            self._ids.append(token)
        before = self._tokenizer.decode(self._ids[:self._prefix], skip_special_tokens=True)
        after = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if not final and (after.endswith("\ufffd") or not after.startswith(before)):
            return ""  # an incomplete character: wait for the next token
        new = after[len(before):] if after.startswith(before) else after
        self._ids = self._ids[-8:]
        self._prefix = len(self._ids)
        return new

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Decode new tokens; returns the text now safe to emit. final: generation ended, flush
        what was held back for a stop string."""
        stream, ids = self._stream, self._ids
        if len(token_ids) == 1 and stream is not None and not final and not self.stop and not self.stopped:
            # The decode step's case, kept lean: one token, nothing held back, all of it emitted.
            token = int(token_ids[0])
            ids.append(token)
            piece = stream.step(self._backend, token)
            if piece is None:  # part of a character: the next token completes it
                return ""
            if len(ids) > 32:
                del ids[:-8]
            self._prefix = len(ids)
            self._text += piece
            self._emitted = len(self._text)
            return piece
        for token in token_ids:
            if self.stopped:
                break
            token = int(token)
            if stream is None:
                piece = self._window_step(token)
            else:
                ids.append(token)
                piece = stream.step(self._backend, token)
                if piece is None:  # part of a character: the next token completes it
                    continue
                if len(ids) > 32:  # trimmed now and then, not sliced every token
                    del ids[:-8]
                self._prefix = len(ids)
            if piece:
                self._add(piece)
        if final and not self.stopped and len(self._ids) > self._prefix:
            self._add(self._window_step(-1, final=True))  # a character never completed: U+FFFD
        end = len(self._text) if (final or self.stopped) else max(len(self._text) - self._hold, self._emitted)
        new, self._emitted = self._text[self._emitted:end], end
        return new

    def _add(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        if not self.stop:
            self._text += piece
            return
        start = max(len(self._text) - self._hold, 0)
        self._text += piece
        window = self._text[start:]
        hits = [i for i in (window.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._text = self._text[:start + min(hits)]
            self.stopped = True
