"""Incremental detokenization: each new token costs O(1) decoding work (tokenizers' DecodeStream,
which holds back bytes of a character split across tokens), never a re-decode of the response.
Stop strings are matched on the text as it grows; text past a stop string is never emitted, and
while a stop string could still be completing, its possible start is held back."""

from __future__ import annotations

from collections.abc import Sequence


class BytePieces(dict):
    """token id -> its text when a ByteLevel decoder (GPT-2, Llama 3, Qwen) decodes it after any
    text that ends on a whole character: the token's own bytes when they are whole UTF-8
    characters, else None (a part of a character, an added or special token: the stream decodes
    it). Filled as tokens are first seen. A dict lookup in place of a DecodeStream.step (1.4 us
    a call timed alone); bench/host_overhead.py's b256 detokenize phase went from 0.34 to 0.27 ms."""

    def __init__(self, backend):
        super().__init__()
        self._backend = backend
        self._added = set(backend.get_added_tokens_decoder())
        self._vocab = backend.get_vocab_size(with_added_tokens=False)

    @staticmethod
    def of(tokenizer) -> BytePieces | None:
        """The table for a tokenizer whose decoder is ByteLevel alone; None for any other."""
        from tokenizers.decoders import ByteLevel

        backend = getattr(tokenizer, "backend_tokenizer", None)
        return BytePieces(backend) if backend is not None and isinstance(backend.decoder, ByteLevel) else None

    def __missing__(self, token: int) -> str | None:
        piece = None
        if 0 <= token < self._vocab and token not in self._added:
            text = self._backend.decode([token], skip_special_tokens=False)
            if text and "\ufffd" not in text:  # whole characters (or a real U+FFFD: left to the stream)
                piece = text
        self[token] = piece
        return piece


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 pieces: BytePieces | None = None):
        """pieces: the tokenizer's BytePieces, if it has one (the stream is skipped for the tokens
        it knows while the text ends on a whole character)."""
        self.stop = list(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        # The text decoded so far (past a stop string: cut there) is _text + the _parts, joined
        # when it is read: a join now and then, not a copy of the whole text each token (str +=
        # on an attribute copies: quadratic in the response).
        self._text = ""
        self._parts: list[str] = []
        self._len = 0  # characters of the text
        self._emitted = 0  # characters of the text already returned
        self._pending = ""  # the text past _emitted: what a stop string is matched on, and held
        self.stopped = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = (backend or tokenizer).decode
        # The prompt's last tokens are the context. A prompt that ends inside a character leaves
        # those bytes out of it: the context must decode to whole characters, or the stream's
        # first text would be the whole window (the prompt repeated) rather than what follows it.
        window = list(prompt_ids)[-8:]
        context = list(window)
        while context and self._decode(context, skip_special_tokens=True).endswith("\ufffd"):
            context.pop()
        # Every piece of the window ends in U+FFFD (literal ones, or bytes never completed): the
        # stream cannot tell which, and no context at all changes how some decoders begin (a
        # Metaspace's leading space). The window decode then runs until the first text, and the
        # stream starts after it (_start_stream).
        self._deferred = backend is not None and bool(window) and not context
        if self._deferred:
            context = window
        self._backend = backend
        self._stream = None
        if backend is not None and not self._deferred:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=list(context), skip_special_tokens=True)
        # Recent ids: the first _prefix are decoded (context for the window decode of slow
        # tokenizers and of the final flush); the rest are a character still incomplete.
        self._ids: list[int] = context
        self._prefix = len(self._ids)
        # Whether the stream's text ends on a whole character (it does now: the context does):
        # then a token in pieces adds its piece whatever came before (ByteLevel decodes bytes,
        # then UTF-8 over all of them).
        self._given_pieces = pieces
        self._pieces = pieces if self._stream is not None else None
        self._whole = self._pieces is not None
        # push_token applies: a fast tokenizer and no stop string (so never stopped)
        self.lean = self._stream is not None and not self.stop

    def _start_stream(self) -> None:
        """A deferred stream starts on the recent ids, whose text now ends on a whole character."""
        from tokenizers.decoders import DecodeStream

        self._stream = DecodeStream(ids=list(self._ids), skip_special_tokens=True)
        self._deferred = False
        self._pieces = self._given_pieces
        self._whole = self._pieces is not None
        self.lean = not self.stop

    @property
    def text(self) -> str:
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def _window_step(self, token: int, final: bool = False) -> str:
        """Decode a short window and emit what grew past its context (slow tokenizers, and the
        flush of a character never completed)."""
        if token >= 0:
            self._ids.append(token)
        before = self._decode(self._ids[:self._prefix], skip_special_tokens=True)
        after = self._decode(self._ids, skip_special_tokens=True)
        if not final and (after.endswith("\ufffd") or not after.startswith(before)):
            return ""  # an incomplete character: wait for the next token
        new = after[len(before):] if after.startswith(before) else after
        self._ids = self._ids[-8:]
        self._prefix = len(self._ids)
        return new

    def push_token(self, token: int) -> str:
        """push([token]) while generation goes on, where lean: the decode step's case, kept lean
        (one token, nothing held back, all of it emitted)."""
        ids = self._ids
        ids.append(token)
        piece = self._pieces[token] if self._whole else None
        if piece is None:
            piece = self._stream.step(self._backend, token)
            self._whole = piece is not None and self._pieces is not None
            if piece is None:  # part of a character: the next token completes it
                return ""
        if len(ids) > 32:  # trimmed now and then, not sliced every token
            del ids[:-8]
        self._prefix = len(ids)
        self._parts.append(piece)
        self._len += len(piece)
        self._emitted = self._len  # no stop string: all of it goes out
        return piece

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Decode new tokens; returns the text now safe to emit. final: generation ended, flush
        what was held back for a stop string."""
        if len(token_ids) == 1 and not final and self.lean:
            return self.push_token(int(token_ids[0]))
        stream, ids = self._stream, self._ids
        for token in token_ids:
            if self.stopped:
                break
            token = int(token)
            if stream is None:
                piece = self._window_step(token)
                if piece and self._deferred:
                    self._start_stream()
                    stream = self._stream
            else:
                ids.append(token)
                piece = self._pieces[token] if self._whole else None
                if piece is None:
                    piece = stream.step(self._backend, token)
                    self._whole = piece is not None and self._pieces is not None
                if piece is None:  # part of a character: the next token completes it
                    continue
                if len(ids) > 32:  # trimmed now and then, not sliced every token
                    del ids[:-8]
                self._prefix = len(ids)
            if piece:
                self._add(piece)
        if final and not self.stopped and len(self._ids) > self._prefix:
            self._add(self._window_step(-1, final=True))  # a character never completed: U+FFFD
        end = self._len if (final or self.stopped) else max(self._len - self._hold, self._emitted)
        k = end - self._emitted
        new, self._pending, self._emitted = self._pending[:k], self._pending[k:], end
        return new

    def _add(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        if self.stop:
            # A stop string may start in the text's last _hold characters, which are never
            # emitted before the next piece comes: they are the end of _pending.
            pending = self._pending
            tail = pending[max(len(pending) - self._hold, 0):]
            window = tail + piece
            hits = [i for i in (window.find(s) for s in self.stop) if i >= 0]
            if hits:
                keep = window[:min(hits)]
                text = self.text
                self._text = text[:len(text) - len(tail)] + keep
                self._len = len(self._text)
                self._pending = pending[:len(pending) - len(tail)] + keep
                self.stopped = True
                return
        self._parts.append(piece)
        self._len += len(piece)
        self._pending += piece
