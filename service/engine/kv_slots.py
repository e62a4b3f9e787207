"""A fixed pool of KV-cache slots: one contiguous `[max_len]` strip of keys and values per row.

Why slots and not pages: M²PT rows need nothing from paging (no shared prefixes: every checkpoint's
prompts differ at every layer), and a slot is what transformers' attention can read as a plain
tensor view, with no paged-attention kernel. The price is that a slot reserves a request's whole
length, so admission is decided by KV memory: `slots x max_len` positions, allocated once.

The pool is kept compact: the rows that decode are physical slots `0..n-1`, so one decode step
reads `keys[:n, :, :T]` as a view (no gather copy of the whole cache per layer); a row that leaves
swaps with the last decoding row, and a prefilled row swaps into slot `n` (each a copy of at most
two rows' used positions, once per request).

`SlotCache` is what the language model's attention layers call: transformers' `Cache.update`
protocol (`update(key, value, layer_idx, kwargs=...)` returns the keys and values to attend to).
The caller binds it to the rows and positions of the next forward and passes the matching 4D mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _dims(config: Any) -> tuple[int, int, int]:
    """Layers, key/value heads and head width of a decoder config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position takes over every layer of a decoder config."""
    layers, kv_heads, head_dim = _dims(config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotCache:
    """Keys and values `[slots, kv_heads, max_len, head_dim]` per layer, and the binding of the
    next forward: rows `lo..lo+B-1`, each writing `q` new positions from its own start."""

    def __init__(
        self, config: Any, slots: int, max_len: int, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        layers, kv_heads, head_dim = _dims(config)
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len
        self.nbytes = kv_bytes_per_token(config, dtype) * slots * max_len
        self._lo, self._starts, self._q, self._kv_len = 0, torch.zeros(1, dtype=torch.long), 1, 1

    def bind(self, lo: int, starts: Tensor, q: int) -> None:
        """The next forward: rows `lo..lo+len(starts)-1`, row b writing positions
        `starts[b]..starts[b]+q-1` (q > 1 only for one row: a prefill chunk)."""
        if q > 1 and len(starts) != 1:
            raise ValueError("a prefill chunk is one row")
        self._lo, self._q = lo, q
        self._starts = starts.to(self.keys[0].device)
        self._kv_len = int(starts.max()) + q
        if self._kv_len > self.max_len:
            raise ValueError(f"{self._kv_len} positions exceed the slot's {self.max_len}")

    def mask(self, dtype: torch.dtype) -> Tensor:
        """Additive `[B, 1, q, kv_len]` mask of the bound forward: query i of row b sees
        positions `<= starts[b] + i` of its own slot (0 = seen, dtype's min = not); additive
        rather than boolean so eager and SDPA attention read it alike."""
        device = self._starts.device
        seen = torch.arange(self._kv_len, device=device)[None, None, :]
        last = self._starts[:, None, None] + torch.arange(self._q, device=device)[None, :, None]
        out = torch.zeros(last.shape[0], 1, self._q, self._kv_len, device=device, dtype=dtype)
        return out.masked_fill_((seen > last)[:, None], torch.finfo(dtype).min)

    def positions(self) -> Tensor:
        """`[B, q]` position ids of the bound forward (a row's KV index is its position)."""
        steps = torch.arange(self._q, device=self._starts.device)
        return self._starts[:, None] + steps[None, :]

    # --- transformers' Cache protocol, as the attention layers call it ---------------------------
    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, kwargs: Any = None, **_: Any
    ) -> tuple[Tensor, Tensor]:
        """Write the new positions of the bound rows; return their keys and values so far."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        lo, rows = self._lo, key.shape[0]
        if self._q == 1:
            index = torch.arange(lo, lo + rows, device=key.device)
            k[index, :, self._starts] = key[:, :, 0].to(k.dtype)
            v[index, :, self._starts] = value[:, :, 0].to(v.dtype)
        else:
            start = int(self._starts[0])
            k[lo, :, start : start + self._q] = key[0].to(k.dtype)
            v[lo, :, start : start + self._q] = value[0].to(v.dtype)
        return k[lo : lo + rows, :, : self._kv_len], v[lo : lo + rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - self._q

    # --- moving rows ------------------------------------------------------------------------
    def swap(self, a: int, b: int, upto: int) -> None:
        """Exchange slots a and b (their first `upto` positions: the rest is never read)."""
        if a == b or upto <= 0:
            return
        pair, back = [a, b], [b, a]
        for t in (*self.keys, *self.values):
            t[pair, :, :upto] = t[back, :, :upto]  # the right side is a copy: a true swap
