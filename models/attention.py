"""What the shared LM needs from an attention module, and the KV cache every attention decodes with.

The LM, the cost accounting, generation and the decode benchmark only see this interface, so an
arm is one small module passed in, and mypy checks every use of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """One layer's decoding cache: named tensors laid out (batch, tokens, ...), grown along tokens.

    What is cached depends on the attention and its `mode` (K and V per head for MHA; for MLA either
    the same expanded per-head K and V, or only the normalised latent and the rotary key). Storage is
    preallocated for `capacity` tokens and doubled when full, so a decode step writes only the new
    token instead of copying the whole cache.
    """

    def __init__(self, mode: str, capacity: int = 256) -> None:
        self.mode = mode
        self.capacity = max(1, capacity)
        self.length = 0
        self._storage: dict[str, torch.Tensor] = {}

    def update(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Append the new tokens of each named tensor; return views of everything cached so far."""
        added = next(iter(new.values())).shape[1]
        end = self.length + added
        for name, values in new.items():
            stored = self._storage.get(name)
            if stored is None or stored.shape[1] < end:
                capacity = max(end, 2 * stored.shape[1] if stored is not None else self.capacity)
                grown = values.new_empty((values.shape[0], capacity, *values.shape[2:]))
                if stored is not None:
                    grown[:, : self.length] = stored[:, : self.length]
                self._storage[name] = stored = grown
            stored[:, self.length : end] = values
        self.length = end
        return {name: stored[:, :end] for name, stored in self._storage.items()}

    def batch_size(self) -> int:
        """Sequences held (0 before the first update)."""
        return next(iter(self._storage.values())).shape[0] if self._storage else 0

    def select(self, index: torch.Tensor) -> None:
        """Keep the sequences of the batch that `index` names, in its order (repeats allowed): what beam search
        and batch filtering do to a cache (models/hf_model.py)."""
        self._storage = {name: stored.index_select(0, index.to(stored.device)) for name, stored in self._storage.items()}

    def bytes_per_token(self) -> float:
        """Bytes held per cached token of one sequence, measured from the stored tensors (not a formula)."""
        if self.length == 0:
            return 0.0
        used = sum(t[:, : self.length].numel() * t.element_size() for t in self._storage.values())
        batch = next(iter(self._storage.values())).shape[0]
        return used / (batch * self.length)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The cached tensors' shapes (batch, tokens, ...), for reports."""
        return {name: (t.shape[0], self.length, *t.shape[2:]) for name, t in self._storage.items()}


def float32_rms_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm computed in float32 (as DeepSeek computes its latent norms), returned in x's dtype: the norm an
    attention module applies inside itself (MLA's latent norms, a QK-norm), safe in bf16 with or without autocast.

    Under bf16 autocast x is a bf16 projection output; in a module cast to bf16 (no autocast) both x and
    the gain are bf16. Either way the norm runs fused on float32 operands, and the result goes back to
    x's dtype, so the next projection gets the dtype its weight has (a float32 result would meet a bf16
    weight and matmul would refuse it).
    """
    normed = F.rms_norm(x.float(), norm.normalized_shape, None if norm.weight is None else norm.weight.float(), norm.eps)
    return normed.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """(batch, seq, d_model) -> (batch, seq, d_model), causal; records the kernel that really ran.

    With a KVCache, x holds only the new tokens: they are placed after the cached ones (RoPE
    positions included), added to the cache, and attend to everything cached.
    """

    cache_modes: tuple[str, ...] = ()  # what new_cache accepts, the first the default; () for no cached decode path

    def __init__(self) -> None:
        super().__init__()
        self.backend = "auto"  # which kernel to use; "eager" selects the plain-math reference
        self.backend_used: str | None = None  # the kernel that ran in the last forward pass

    def new_cache(self, mode: str | None = None, capacity: int = 256) -> KVCache:
        if not self.cache_modes:
            raise ValueError(f"{type(self).__name__} has no cached decode path; decode with cache mode none")
        mode = mode or self.cache_modes[0]
        if mode not in self.cache_modes:
            raise ValueError(f"{type(self).__name__} has no {mode!r} cache; choose one of {', '.join(self.cache_modes)}")
        return KVCache(mode, capacity)

    def plan(self, device: torch.device) -> str | None:
        """Choose ahead of time anything that depends on the device (called before training or
        compiling, so forward never queries the runtime); returns a note on the choice, or None."""
        return None

    def kv_cache_values_per_token(self, mode: str | None = None) -> int:
        """Values a decoder keeps per token in this layer's KV cache (the analytic count); only asked of an
        attention with cache_modes."""
        raise NotImplementedError(f"{type(self).__name__} declares cache_modes but not kv_cache_values_per_token()")

    def score_dims(self) -> tuple[int, int, int]:
        """(heads, q/k head dim, v head dim) for the analytic FLOP count."""
        raise NotImplementedError(f"{type(self).__name__} does not declare score_dims()")

    def muon_blocks(self) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """The logical matrices packed into fused weights, for the optimizer (training/optim.py).

        Maps a parameter's attribute name (e.g. "qkv_proj.weight") to [(block name, row indices)], the
        blocks partitioning its rows; Muon orthogonalises (and scales the LR of) each block on its own,
        so every arm's Q, K, V, ... are treated alike however the module packs them. Parameters not
        listed are one block. Index tensors are created on the parameter's device. The forward pass and
        the parameters themselves are untouched.
        """
        return {}

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        raise NotImplementedError


def interface_problem(attention: CausalSelfAttention) -> str | None:
    """What an attention module fails to declare that the experiment needs (the FLOP count's score_dims, and each
    cache mode's size), in words; None when it declares all of it. Works on a shape-only (meta) module."""
    try:
        dims = attention.score_dims()
        sizes = [attention.kv_cache_values_per_token(mode) for mode in attention.cache_modes]
    except NotImplementedError as error:
        return str(error)
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        return f"{type(attention).__name__}.score_dims() gave {dims!r}, not (heads, q/k head dim, v head dim) > 0"
    if not all(isinstance(size, int) and size > 0 for size in sizes):
        return f"{type(attention).__name__}.kv_cache_values_per_token() gave {sizes!r} for {attention.cache_modes}"
    return None
