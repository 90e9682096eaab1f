"""Token ids → text, one token at a time, with OpenAI `stop` strings.

Decoding the whole output again after every token costs O(length) per token, which adds
up across a batch of long generations (the Generator and the server engine both use this). Instead we decode a short
window: the text of `ids[window:]` minus the text of `ids[window:last]`. A window that
starts a token or two back keeps tokenizers that merge neighbours (leading spaces,
multi-token UTF-8 characters) correct, and a trailing U+FFFD means the last token ended
in the middle of a character, so nothing is released until the next token completes it.

Stop strings: the text never includes the stop string itself, and the tail that could
still grow into a stop string is held back, so a streaming client never sees text that
is later retracted.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """The growing completion text of one sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._window = 0  # first id of the decode window
        self._settled = 0  # ids before this index are already in self.text
        self.text = ""  # decoded so far (truncated at a stop string once one matched)
        self._released = 0  # characters of self.text handed out
        self.stopped = False  # a stop string matched: generation must end

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        settled = self._decode(self._ids[self._window : self._settled])
        grown = self._decode(self._ids[self._window :])
        if grown.endswith(REPLACEMENT_CHAR) or len(grown) <= len(settled):
            return ""  # half a character, or a token that renders as nothing yet
        self.text += grown[len(settled) :]
        self._window, self._settled = self._settled, len(self._ids)
        if self._stop and self._truncate_at_stop():
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The sequence ended (EOS or length): release everything, partial characters too."""
        if not self.stopped and self._settled < len(self._ids):
            settled = self._decode(self._ids[self._window : self._settled])
            grown = self._decode(self._ids[self._window :])
            self.text += grown[len(settled) :]
            self._settled = len(self._ids)
            if self._stop and self._truncate_at_stop():
                self.stopped = True
        return self._release(len(self.text))

    def _truncate_at_stop(self) -> bool:
        # Only the unreleased tail plus one stop-length of context can hold a new match.
        start = max(0, self._released - self._longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self._longest_stop - 1, len(self.text) - self._released), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _release(self, end: int) -> str:
        out = self.text[self._released : end]
        self._released = max(self._released, end)
        return out
