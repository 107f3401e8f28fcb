"""stop_strings for generate(): Transformers' criterion, on each token's own bytes."""

from __future__ import annotations

from typing import Any

import torch


class StopStrings:
    """Transformers' stop-string criterion: a row stops once its text (each token's own string,
    prompt included) holds a stop string that ends inside its last token. So a string split over
    several tokens counts, and so does a last token running past the string's end ("st" +
    "opera" for "stop"). Matching is on bytes; a token's bytes come from the tokenizer's
    `token_table` (ours) or, for another tokenizer, from decoding it after an anchor token."""

    def __init__(self, stops: list[str], tokenizer: Any) -> None:
        self.stops = [s.encode() for s in stops]
        self.reach = max(len(s) for s in self.stops) - 1  # bytes needed before the last token
        table = getattr(tokenizer, "token_table", None)
        self.pieces: dict[int, bytes] = dict(enumerate(table.raw)) if table is not None else {}
        self.tokenizer = None if table is not None else tokenizer

    def piece(self, token: int) -> bytes:
        if token not in self.pieces:  # after an anchor, a leading space is not stripped as first
            anchor = self.tokenizer.encode("a", add_special_tokens=False)[-1:]
            head = self.tokenizer.decode(anchor)
            self.pieces[token] = self.tokenizer.decode(anchor + [token])[len(head):].encode()
        return self.pieces[token]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N,) whether each row's last token completes a stop string."""
        return torch.tensor([self._row(row) for row in ids.tolist()], dtype=torch.bool, device=ids.device)

    def _row(self, row: list[int]) -> bool:
        before, i = b"", len(row) - 1
        while len(before) < self.reach and i > 0:
            i -= 1
            before = self.piece(row[i]) + before
        text = before + self.piece(row[-1])
        return any(s in text[max(0, len(before) - len(s) + 1):] for s in self.stops)
