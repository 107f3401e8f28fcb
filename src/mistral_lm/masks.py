"""Attention masks from absolute positions.

The mask is a function of *positions*, never of buffer order: a rolling KV cache stores keys out
of order, but if every attended key carries its absolute position, one predicate serves full
prefill, chunked prefill, single-token decode and left padding alike.

Sliding-window convention (the one place it is defined): a query at position p sees keys at
positions k with ``p - window < k <= p``, i.e. exactly `window` keys including itself. This is
Transformers' PyTorch Mistral predicate ``kv_idx > q_idx - sliding_window``; the historical
Flax port let the window see W + 1 keys, which is why it is written down here once.
"""

from __future__ import annotations

import torch


def positions_from_padding(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Absolute positions (B, T) for a left- (or right-) padded batch.

    Real tokens are numbered 0, 1, 2, ... from the first unmasked token of each row, plus
    `offset` (tokens already in the cache). Pad slots get position 0: they are never attended.

    Example: mask [[0, 0, 1, 1, 1]] -> positions [[0, 0, 0, 1, 2]].
    """
    mask = attention_mask.long()
    if isinstance(offset, torch.Tensor) and offset.dim() == 1:
        offset = offset[:, None]  # one offset per row, not per column
    positions = mask.cumsum(-1) - 1 + offset
    return positions.clamp(min=0).masked_fill(mask == 0, 0)


def window_predicate(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and windowed) visibility of keys at `k_pos` from queries at `q_pos` (broadcasting)."""
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    return visible


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean mask (B, 1, Q, K), True where query q may attend key k.

    q_pos: (B, Q) absolute query positions; k_pos: (B, K) absolute key positions;
    k_valid: (B, K) False for padding and empty cache slots.

    A query that sees no key at all (a pad query left of the first real token) would give a
    softmax over nothing, i.e. NaN; such rows are opened to every key so the output stays finite.
    Their values are never read: pad positions produce no logits anyone uses.
    """
    mask = window_predicate(q_pos[:, :, None], k_pos[:, None, :], window) & k_valid[:, None, :]
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]
