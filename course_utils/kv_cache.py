"""The key/value cache that makes generation compute each token once.

While a GPT generates, the keys and values of the tokens it has already read do not
change (the causal mask means a token's keys depend only on the tokens before it).
:class:`LayerKVCache` keeps them for one attention layer, in buffers allocated once
for ``capacity`` tokens, so each new token only adds its own row; :class:`KVCache`
holds one per layer for a whole model. ``MultiHeadAttention`` (in ``attention``)
reads and writes a :class:`LayerKVCache`; this module sits below it and imports
nothing from the course.

The cache is for inference only. Appending writes into the buffers in place, which
autograd cannot differentiate through, so an append that would need gradients is
refused with an error; run cached forwards under ``torch.no_grad()`` (``generate``
does).
"""
from __future__ import annotations

import torch


def _describe(t: torch.Tensor) -> str:
    b, h, _, hd = t.shape
    kind = ", inference tensors" if t.is_inference() else ""
    return f"batch {b}, {h} heads of size {hd}, {t.dtype} on {t.device}{kind}"


class LayerKVCache:
    """Keys and values of one attention layer, in preallocated (B, H, capacity, hd) buffers.

    The buffers are created by the first :meth:`append` after construction or
    :meth:`reset`, shaped after the keys it receives. Later appends must match them in
    batch size, heads, head size, dtype and device; after a reset, buffers that do
    not match are replaced, and buffers that do are reused without allocating.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"A KV cache needs room for at least one token, got capacity={capacity}.")
        self.capacity = capacity
        self.keys: torch.Tensor | None = None  # (B, H, capacity, hd)
        self.values: torch.Tensor | None = None
        self.length = 0  # tokens stored so far

    def reset(self) -> None:
        """Forget the stored tokens; the buffers stay for reuse."""
        self.length = 0

    def _fits(self, keys: torch.Tensor) -> bool:
        held = self.keys
        return (
            held is not None
            and held.shape[:2] == keys.shape[:2]
            and held.shape[3] == keys.shape[3]
            and held.dtype == keys.dtype
            and held.device == keys.device
            and held.is_inference() == keys.is_inference()
        )

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, H, T, hd) keys and values; return everything stored so far.

        Returns views of shape (B, H, length, hd) into the buffers, valid until the
        next append or reset.
        """
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                f"Keys and values must both be (batch, heads, tokens, head_dim); got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}."
            )
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            raise RuntimeError(
                "The KV cache is for inference only: it writes keys and values into its buffers in "
                "place, which autograd cannot train through. Run cached forwards under torch.no_grad() "
                "(generate does), or call the model without cache= to train."
            )
        if self.length == 0 and not self._fits(keys):
            b, h, _, hd = keys.shape
            self.keys = keys.new_empty(b, h, self.capacity, hd)
            self.values = values.new_empty(b, h, self.capacity, hd)
        elif not self._fits(keys):
            raise ValueError(
                f"This KV cache holds {self.length} tokens of {_describe(self.keys)}, but the new keys "
                f"are {_describe(keys)}. Call cache.reset() before feeding a different batch or model."
            )
        new = keys.shape[2]
        end = self.length + new
        if end > self.capacity:
            raise ValueError(
                f"KV cache full: {self.length} cached + {new} new tokens exceed its capacity "
                f"{self.capacity}; reset the cache and feed at most the last {self.capacity} tokens."
            )
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """One :class:`LayerKVCache` per transformer block, plus the position reached.

    Pass the same cache to successive ``model(idx, cache=cache)`` calls: the first
    call feeds the prompt, each later call only the new token(s), whose positions
    continue after the cached ones. ``GPTModel.new_cache()`` makes one of the right
    size.
    """

    def __init__(self, n_layers: int, capacity: int):
        self.layers = [LayerKVCache(capacity) for _ in range(n_layers)]
        self.capacity = capacity

    @property
    def length(self) -> int:
        """Tokens cached so far (the same in every layer)."""
        return self.layers[0].length if self.layers else 0

    def reset(self) -> None:
        """Start a new sequence; the buffers are kept and reused if they fit."""
        for layer in self.layers:
            layer.reset()
