"""How many tokens an answer used, from what the child said in it.

In order of trust: an OpenAI `usage` object (prompt_tokens/completion_tokens, or the
input_tokens/output_tokens of /v1/messages and /v1/responses); llama.cpp's `timings` (prompt_n
plus the cache_n it reused, predicted_n), which its streams carry in their last chunk; the
tokens_evaluated/tokens_predicted of /completion. A stream cut before any of those counts one
completion token per piece of content it sent, which is what llama-server streams.
The fields are found by a pattern over the bytes as they pass, not by parsing each chunk: a
stream costs a search per chunk, and an answer is never held back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|prompt_n|cache_n|predicted_n|'
                    rb'tokens_evaluated|tokens_predicted)"\s*:\s*(\d+)')
_PIECE = re.compile(rb'"(?:reasoning_)?content"\s*:\s*"(?!")')  # content that is not empty
_OVERLAP = 48  # bytes of the last chunk kept, so that a field split between two chunks is found


@dataclass(frozen=True)
class Used:
    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class Meter:
    def __init__(self, counted: bool = True) -> None:
        self.counted = counted  # False for the endpoints that only count tokens (count_tokens, tokenize)
        self.stream = False  # set for an event stream: only there is a piece of content a token
        self._last: dict[bytes, int] = {}  # each field's last value
        self._pieces = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Bytes of the answer, in order (a whole body, or each chunk of a stream)."""
        if not self.counted:
            return
        window = self._tail + data
        start = len(self._tail)
        for match in _FIELD.finditer(window):
            if match.end() > start:  # (one wholly inside the kept tail was counted with the last chunk)
                # A stream's figures grow as it goes (the last one is the total); a whole body
                # may hold several answers (/completion with a list of prompts), each counted.
                name, value = match.group(1), int(match.group(2))
                self._last[name] = value if self.stream else self._last.get(name, 0) + value
        self._pieces += sum(1 for m in _PIECE.finditer(window) if m.end() > start)
        self._tail = window[-_OVERLAP:]

    def used(self) -> Used:
        if not self.counted:
            return Used()
        f = self._last
        if b"prompt_tokens" in f or b"input_tokens" in f:
            return Used(f.get(b"prompt_tokens", f.get(b"input_tokens", 0)),
                        f.get(b"completion_tokens", f.get(b"output_tokens", 0)))
        if b"predicted_n" in f or b"prompt_n" in f:
            return Used(f.get(b"prompt_n", 0) + f.get(b"cache_n", 0), f.get(b"predicted_n", 0))
        if b"tokens_predicted" in f:
            return Used(f.get(b"tokens_evaluated", 0), f[b"tokens_predicted"])
        return Used(0, self._pieces if self.stream else 0)
