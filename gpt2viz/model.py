"""GPT-2 in one readable file, with named hook points on every activation worth seeing.

Module names mirror the Hugging Face checkpoint (`wte`, `wpe`, `ln_1`, `attn.c_attn`, ...)
except that `h.{i}` is called `blocks.{i}`; the loader does that rename and transposes
the four Conv1D weights. Shapes in comments: B batch, T new positions, S = past + T key
positions, H heads, D head size, C model width.

Hook points (full name: shape):

    embed                     [batch, pos, d_model]   token embedding
    pos_embed                 [batch, pos, d_model]   position embedding
    blocks.{i}.resid_pre      [batch, pos, d_model]   residual stream entering block i
    blocks.{i}.attn.q/k/v     [batch, head, pos, d_head]
    blocks.{i}.attn.scores    [batch, head, query, key] scaled, masked (-inf) scores
    blocks.{i}.attn.pattern   [batch, head, query, key] softmax of the scores
    blocks.{i}.attn.z         [batch, head, pos, d_head] per-head output before c_proj
    blocks.{i}.attn_out       [batch, pos, d_model]   attention output (after c_proj)
    blocks.{i}.resid_mid      [batch, pos, d_model]   residual after attention
    blocks.{i}.mlp.pre        [batch, pos, d_mlp]     MLP neurons before GELU
    blocks.{i}.mlp.post       [batch, pos, d_mlp]     MLP neurons after GELU
    blocks.{i}.mlp_out        [batch, pos, d_model]
    blocks.{i}.resid_post     [batch, pos, d_model]   residual stream leaving block i
    ln_final                  [batch, pos, d_model]   output of the final layer norm
    logits                    [batch, pos, vocab]

With a KV cache, `k` and `v` hold only the new positions and `pattern` has `query` = new
positions, `key` = all positions so far.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import functools
import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import ActivationCache, HookFn, HookPoint, resolve_name


class ContextLengthError(ValueError):
    """The sequence would be longer than the model's context window (`n_positions`)."""


class ConfigError(ValueError):
    """A config that does not describe a GPT-2 model gpt2viz can run faithfully."""


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"config field 'n_inner' must be a positive integer or null, got {self.n_inner!r}")
        if self.activation_function not in TANH_GELU_NAMES:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not GPT-2's tanh GELU "
                f"(expected one of {sorted(TANH_GELU_NAMES)})"
            )

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GPT2Config":
        """Read a Hugging Face `config.json` dict; refuse anything that is not plain GPT-2."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"config.json describes model_type {model_type!r}, not 'gpt2'")
        unsupported = {
            "add_cross_attention": False,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
        }
        for key, plain in unsupported.items():
            if key in d and d[key] != plain:
                raise ConfigError(f"config.json sets {key}={d[key]!r}; gpt2viz supports only plain GPT-2 ({key}={plain})")
        values = {}
        for f in fields(cls):
            if f.name in d:
                values[f.name] = d[f.name]
        if "n_positions" not in d and "n_ctx" in d:
            values["n_positions"] = d["n_ctx"]
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions") if k not in values]
        if missing:
            raise ConfigError(f"config.json lacks required GPT-2 field(s): {', '.join(missing)}")
        return cls(**values)

    def to_hf_dict(self) -> dict:
        """The `config.json` that Hugging Face `GPT2LMHeadModel` reads."""
        d = asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                 bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)
        return d


TANH_GELU_NAMES = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


ATTN_BUCKET = 64  # a decode row's attention runs over its length rounded up to this (`attend_rows`)
SLAB_ROWS = 16  # one-sequence caches per `KVSlab`
SPARE_ROWS = 2 * SLAB_ROWS  # free rows kept resident for the next texts to start in (`_Slabs.warm`): a class of 30


def bucket_end(length: int) -> int:
    """The positions a decode row of a text of `length` positions attends over in `attend_rows` (the rest masked)."""
    return -(-length // ATTN_BUCKET) * ATTN_BUCKET


def slab_capacity(end: int) -> int:
    """The capacity of the slab row that holds `end` positions: a power of two, at least `ATTN_BUCKET` (so it
    holds `bucket_end(end)`), i.e. growth by doubling."""
    return max(ATTN_BUCKET, 1 << max(0, end - 1).bit_length())


class KVSlab:
    """The keys and values of `SLAB_ROWS` one-sequence caches of one capacity (CPU), every layer:
    `k[layer]`, `v[layer]` `[rows, H, capacity, D]`. Sequences whose caches share a slab append and attend
    together (`GPT2.forward_ragged`: per layer one append and two products for all of them instead of a few
    calls each). Allocated empty: a row's memory becomes resident as its positions are written (`cold`: the rows
    never handed out nor written by `_Slabs.warm`).
    Invariant of a row in use: its positions `[length, bucket_end(length))` hold zeros (finite values for the
    masked tail `attend_rows` multiplies by zero)."""

    def __init__(self, key: tuple) -> None:
        n_layer, H, capacity, D, dtype = key
        self.key, self.capacity = key, capacity
        self.k = [torch.empty(SLAB_ROWS, H, capacity, D, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(SLAB_ROWS, H, capacity, D, dtype=dtype) for _ in range(n_layer)]
        self.free = list(range(SLAB_ROWS))
        self.cold = set(range(SLAB_ROWS))

    def write(self, rows) -> None:
        """Zero these (free) rows in every layer: their memory becomes resident."""
        with torch.no_grad():
            for t in self.k + self.v:
                t[list(rows)] = 0


class _Slabs:
    """Every live slab, by (n_layer, H, capacity, D, dtype); rows handed out lowest first, from slabs partly in use
    before spare ones, so caches made one after another (a class starting together) sit side by side. A slab whose
    rows are all free is dropped, unless it is one of the `SPARE_ROWS` free rows kept for the capacity texts start
    at (`start_key`), which `warm` makes up and writes when the server is idle: the next class's first pass (30
    students taking an example's reading into new rows: ~34,000 pages for gpt2) then writes into memory the OS has
    mapped already instead of waiting for it (~10 µs a page on this project's VMs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slabs: dict[tuple, list[KVSlab]] = {}
        self._returned: collections.deque[tuple[KVSlab, int]] = collections.deque()
        self.start_key: tuple | None = None  # the key of the slab a text last took its first row in

    def take(self, key: tuple, first: bool = False) -> tuple[KVSlab, int]:
        """A free row of a slab of `key` (`first`: the text's first row, whose key `warm` keeps spare rows of)."""
        with self._lock:
            self._settle()
            if first:
                self.start_key = key
            slabs = self._slabs.setdefault(key, [])
            slab = next((s for s in slabs if s.free and len(s.free) < SLAB_ROWS), None) or next((s for s in slabs if s.free), None)
            if slab is None:
                slab = KVSlab(key)
                slabs.append(slab)
            row = slab.free.pop(0)
            slab.cold.discard(row)
            return slab, row

    def give_back(self, slab: KVSlab, row: int) -> None:
        """A cache's finalizer hands its row back: it may run wherever the collector does, also inside a section that
        holds the lock (an allocation there started a collection), so the row is queued and settled when the lock is free."""
        self._returned.append((slab, row))
        if self._lock.acquire(blocking=False):
            try:
                self._settle()
            finally:
                self._lock.release()

    def _settle(self) -> None:
        while self._returned:
            slab, row = self._returned.popleft()
            slab.free.append(row)
            slab.free.sort()
            slabs = self._slabs.get(slab.key, [])
            if len(slab.free) == SLAB_ROWS and slab in slabs and (slab.key != self.start_key or self._warm_rows(slab.key, slab) >= SPARE_ROWS):
                slabs.remove(slab)

    def _warm_rows(self, key: tuple, but: KVSlab | None = None) -> int:
        return sum(len(s.free) - len(s.cold.intersection(s.free)) for s in self._slabs.get(key, []) if s is not but)

    def warm(self, key: tuple | None = None) -> int:
        """Drop the free slabs of other capacities; write `start_key`'s (or, before any text started, `key`'s) free rows
        and make new slabs, written, until `SPARE_ROWS` rows are free and resident. Slow where it allocates (~0.1 s a
        slab of gpt2's shape): for when the server is idle. Returns the rows written."""
        with self._lock:
            self._settle()
            key = self.start_key or key
            for k, slabs in self._slabs.items():
                if k != key:
                    slabs[:] = [s for s in slabs if len(s.free) < SLAB_ROWS]
            if key is None:
                return 0
            ready, cold = self._warm_rows(key), []
            for s in self._slabs.get(key, []):
                rows = [r for r in s.free if r in s.cold][: max(0, SPARE_ROWS - ready)]
                if rows:
                    cold.append((s, rows))
                    ready += len(rows)
                    s.free = [r for r in s.free if r not in rows]  # out of reach of `take` while they are written
        made = []
        for s, rows in cold:
            s.write(rows)
        while ready + SLAB_ROWS * len(made) < SPARE_ROWS:
            made.append(KVSlab(key))
            made[-1].write(range(SLAB_ROWS))
        with self._lock:
            for s, rows in cold:
                s.free = sorted(s.free + rows)
                s.cold.difference_update(rows)
            for slab in made:
                slab.cold.clear()
            self._slabs.setdefault(key, []).extend(made)
        return sum(len(rows) for _, rows in cold) + SLAB_ROWS * len(made)

    def count(self) -> int:
        with self._lock:
            self._settle()
            return sum(len(v) for v in self._slabs.values())


SLABS = _Slabs()


class KVCache:
    """Keys and values of every layer for all positions seen so far, `[batch, head, pos, d_head]`.

    Storage grows by doubling so that appending one position is O(1) amortised.
    `truncate(n)` rewinds to the first n positions (used for branching).
    A cache of one sequence on the CPU keeps its storage in a row of a shared `KVSlab` (views of it), so that
    `forward_ragged` can attend for many sequences in one product; a batched cache has tensors of its own.
    """

    def __init__(self, n_layer: int) -> None:
        self.length = 0
        self._k: list[torch.Tensor | None] = [None] * n_layer
        self._v: list[torch.Tensor | None] = [None] * n_layer
        self._k1: list[torch.Tensor | None] = [None] * n_layer
        self._v1: list[torch.Tensor | None] = [None] * n_layer
        self.slab: KVSlab | None = None  # with `row`, where the storage is (one sequence, CPU)
        self.row = -1
        self._release: weakref.finalize | None = None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new positions `[B, H, T, D]` after `self.length`; return all keys and values `[B, H, S, D]`."""
        start, end = self.length, self.length + k.shape[2]
        buf_k, buf_v = self._room(layer, end, k)
        with self._no_grad():
            buf_k[:, :, start:end] = k
            buf_v[:, :, start:end] = v
            return buf_k[:, :, :end], buf_v[:, :, :end]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`append` for a cache of one sequence, without its batch axis: new positions `[H, T, D]` in, all
        keys and values `[H, S, D]` out."""
        start, end = self.length, self.length + k.shape[1]
        if self._k[layer] is None or self._k[layer].shape[2] < end or (self.slab is not None and bucket_end(end) > bucket_end(start)):
            self._room(layer, end, k[None])
        buf_k, buf_v = self._k1[layer], self._v1[layer]
        with self._no_grad():
            buf_k[:, start:end] = k
            buf_v[:, start:end] = v
            return buf_k[:, :end], buf_v[:, :end]

    def ready(self, end: int, n_head: int, d_head: int, dtype: torch.dtype) -> bool:
        """Before a pass writes positions up to `end` into a one-sequence CPU cache: a slab row that holds them, its
        tail zeroed in every layer (`KVSlab`'s invariant). Returns whether the cache is in a slab."""
        if self.slab is None and any(k is not None for k in self._k):
            return False  # a batched cache (or another device's): tensors of its own
        self._slab_room(end, n_head, d_head, dtype)
        return True

    def _slab_room(self, end: int, n_head: int, d_head: int, dtype: torch.dtype, layer: int | None = None) -> None:
        """A slab row that holds `end` positions, its tail `[end, bucket_end(end))` zeroed (in one layer, or all)."""
        if self.slab is None or self.slab.capacity < end:
            self._to_slab(slab_capacity(end), n_head, d_head, dtype)
        if bucket_end(end) > bucket_end(self.length):
            self._zero(end, bucket_end(end), layer)

    def _room(self, layer: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers `[B, H, capacity, D]`, grown (by doubling) to hold `end` positions."""
        if self.slab is not None or (like.shape[0] == 1 and like.device.type == "cpu" and all(k is None for k in self._k)
                                     and not (torch.is_grad_enabled() and like.requires_grad)):
            self._slab_room(end, like.shape[1], like.shape[3], like.dtype, layer)
            return self._k[layer], self._v[layer]
        buf_k, buf_v = self._k[layer], self._v[layer]
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 16))
            new_k = like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[3])
            new_v = like.new_empty(new_k.shape)
            if buf_k is not None:
                new_k[:, :, :self.length] = buf_k[:, :, :self.length]
                new_v[:, :, :self.length] = buf_v[:, :, :self.length]
            self._set(layer, new_k, new_v)
            buf_k, buf_v = new_k, new_v
        return buf_k, buf_v

    def _to_slab(self, capacity: int, n_head: int, d_head: int, dtype: torch.dtype, n: int | None = None,
                 source: "KVCache | None" = None) -> None:
        """Move (or, from `source`, copy) the first `n` positions (default: `length`) of every layer into a row of a
        slab of `capacity`, give the old row back, and zero the new row's tail up to `bucket_end(n)`."""
        source = source or self
        n = source.length if n is None else n
        slab, row = SLABS.take((len(self._k), n_head, capacity, d_head, dtype), first=self.slab is None)
        with torch.no_grad():
            for layer in range(len(self._k)):
                k, v = slab.k[layer][row], slab.v[layer][row]
                if source._k1[layer] is not None and n:  # a one-sequence source always has these views
                    k[:, :n] = source._k1[layer][:, :n]
                    v[:, :n] = source._v1[layer][:, :n]
                k[:, n:bucket_end(n)] = 0
                v[:, n:bucket_end(n)] = 0
                self._k[layer], self._v[layer] = slab.k[layer][row:row + 1], slab.v[layer][row:row + 1]
                self._k1[layer], self._v1[layer] = k, v
        if self._release is not None:
            self._release()  # after the copy: the old row may be handed out again
        self.slab, self.row = slab, row
        self._release = weakref.finalize(self, SLABS.give_back, slab, row)

    def _zero(self, start: int, stop: int, layer: int | None = None) -> None:
        with torch.no_grad():
            for i in range(len(self._k)) if layer is None else (layer,):
                self._k1[i][:, start:stop] = 0
                self._v1[i][:, start:stop] = 0

    def _no_grad(self):
        """Slabs are shared by many caches: they never hold autograd history (a cache that needs it, one whose
        first keys require grad, gets tensors of its own)."""
        return torch.no_grad() if self.slab is not None and torch.is_grad_enabled() else contextlib.nullcontext()

    def _set(self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        self._k[layer], self._v[layer] = k, v
        single = k is not None and k.shape[0] == 1
        self._k1[layer], self._v1[layer] = (k[0], v[0]) if single else (None, None)  # `extend`'s views

    def copy_from(self, other: "KVCache", length: int | None = None) -> None:
        """Become a copy of `other`'s first `length` positions (default: all), sharing no storage with it."""
        n = other.length if length is None else length
        if not 0 <= n <= other.length:
            raise ValueError(f"cannot copy {n} positions of a cache of {other.length}")
        k0 = next((k for k in other._k if k is not None), None)
        if k0 is not None and k0.shape[0] == 1 and k0.device.type == "cpu" and (self.slab is not None or all(k is None for k in self._k)):
            self._to_slab(slab_capacity(n), k0.shape[1], k0.shape[3], k0.dtype, n, other)
        else:
            self._leave_slab()
            for layer, (k, v) in enumerate(zip(other._k, other._v)):
                self._set(layer, k[:, :, :n].clone() if k is not None else None, v[:, :, :n].clone() if v is not None else None)
        self.length = n

    def keys(self, layer: int) -> torch.Tensor:
        """The cached keys of one layer, `[batch, head, length, d_head]`."""
        if self._k[layer] is None:
            raise ValueError("the cache is empty")
        with self._no_grad():
            return self._k[layer][:, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        """The cached values of one layer, `[batch, head, length, d_head]`."""
        if self._v[layer] is None:
            raise ValueError("the cache is empty")
        with self._no_grad():
            return self._v[layer][:, :, : self.length]

    @property
    def nbytes(self) -> int:
        if self.slab is not None:  # its row of the slab, every layer (the store asks this of every text on every request)
            n_layer, n_head, capacity, d_head, dtype = self.slab.key
            return 2 * n_layer * n_head * capacity * d_head * dtype.itemsize
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if self.slab is not None:
            self._zero(length, min(self.length, bucket_end(length)))
        self.length = length

    def _leave_slab(self) -> None:
        if self._release is not None:
            self._release()
        self.slab, self.row, self._release = None, -1, None


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.q, self.k, self.v = HookPoint(), HookPoint(), HookPoint()
        self.scores, self.pattern, self.z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        q, k, v = self.q(q), self.k(k), self.v(v)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(layer, k, v)  # (B, H, S, D)
        S = k.shape[2]
        if self.pattern.observed or self.scores.observed:
            pattern = self.pattern(torch.softmax(self.scores(self.scores_of(q, k)), dim=-1))
            z = pattern @ v
        elif T == 1:
            z = F.scaled_dot_product_attention(q, k, v)
        elif past == 0:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_bias(T, S, x.device, q.dtype))
        z = self.z(z)  # (B, H, T, D)
        return self.c_proj(z.transpose(1, 2).reshape(B, T, C))

    def scores_of(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled, causally masked scores `[B, H, T, S]` of queries `[B, H, T, D]` (the last T of S positions)
        over keys `[B, H, S, D]`: one GEMM with the scale and the -inf bias fused in."""
        B, H, T, D = q.shape
        S = k.shape[2]
        q3, kT = q.reshape(B * H, T, D), k.transpose(-2, -1).reshape(B * H, D, S)
        if T == 1:
            scores = torch.bmm(q3, kT).mul_(D**-0.5)  # a single query sees every key
        else:
            scores = torch.baddbmm(causal_bias(T, S, q.device, q.dtype).expand(B * H, T, S), q3, kT, alpha=D**-0.5)
        return scores.view(B, H, T, S)

    def pattern_from_keys(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The pattern `[H, n, S]` of the last n of S positions, from their ln_1 output `h` `[n, C]` and the
        layer's cached keys `[H, S, D]`: what `forward` computes for them, without the values."""
        n, C = h.shape
        q = F.linear(h, self.c_attn.weight[:C], self.c_attn.bias[:C]).view(1, n, self.n_head, self.d_head).transpose(1, 2)
        return torch.softmax(self.scores_of(q, keys[None]), dim=-1)[0]


def _onednn_packing() -> bool:
    """Whether this torch can pack a linear layer's weight for oneDNN (CPU builds with mkldnn)."""
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), x @ w.T, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


ONEDNN_PACKING = _onednn_packing()


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """`[out, in]` weight in the layout `packed_linear` multiplies fastest: oneDNN's blocked layout on a
    CPU that has it (float32), else the weight itself."""
    if ONEDNN_PACKING and weight.device.type == "cpu" and weight.dtype == torch.float32:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    return weight


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, W, b)` with W from `pack_linear_weight`.

    On this project's CPUs oneDNN with a packed weight multiplies a few rows 2-3x faster than the
    default BLAS call (which serves F.linear), and, unlike it, gives each row the same result
    whatever the number of rows, from two rows up: what makes batched sessions equal to solo ones bit for bit.
    Where oneDNN's kernel for a single row rounds differently from its kernel for more (on a CPU with AVX-512,
    AMD Zen 4: a 3072-wide input; `_one_row_rounds_apart`), one row is multiplied as two (itself twice).
    """
    if weight.is_mkldnn:
        if x.dim() == 2 and x.shape[0] == 1 and _one_row_rounds_apart(tuple(weight.shape), x.dtype):
            return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1).contiguous(), weight, bias, "none", [], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=64)
def _one_row_rounds_apart(shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies one row by a packed `[out, in]` weight with other rounding than the same row among
    several (tried once per shape on random numbers: two kernels that round apart differ on nearly every row)."""
    gen = torch.Generator().manual_seed(0)
    w = pack_linear_weight(torch.randn(shape, generator=gen, dtype=dtype))
    x = torch.randn(3, shape[1], generator=gen, dtype=dtype)
    one = torch.ops.mkldnn._linear_pointwise(x[:1], w, None, "none", [], "")
    return not torch.equal(one, torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")[:1])


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention of one new position over its sequence's keys and values: q `[H, 1, D]`, k and v
    `[H, S, D]` -> z `[H, 1, D]`, softmax(q kᵀ / √D) v as two products (the scores and their scaling
    as `Attention.scores_of` computes them). For a single query the fused kernel's setup costs more than
    these products (`forward_ragged` runs one per sequence and layer)."""
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(q.shape[-1] ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v)


class SlabGroup(NamedTuple):
    """Decode rows of one pass whose caches share a slab and a `bucket_end`: they append and attend together."""

    slab: KVSlab
    lo: int  # the products run over the slab's rows [lo, hi) (rows of others among them: computed, not used)
    hi: int
    width: int  # bucket_end of the rows' lengths after this pass: the positions they attend over
    members: list[int]  # the sequences (indices into the pass's segments), in slab-row order
    at: torch.Tensor  # [G] their rows among the pass's N rows
    rows: torch.Tensor  # [G] their slab rows
    pos: torch.Tensor  # [G] the position each one writes
    rel: torch.Tensor | None  # [G] rows - lo; None when they fill [lo, hi) in order
    mask: torch.Tensor  # [hi - lo, 1, width] True where a row may not attend (beyond its length)
    one: tuple[int, int] | None  # a group of one row: (its row among the N, its position), for plain indexing


def slab_groups(caches: Sequence[KVCache], pasts: list[int], starts: list[int], n_head: int, d_head: int,
                dtype: torch.dtype, candidates: Iterable[int]) -> list[SlabGroup]:
    """The candidate sequences (one new position each) grouped by slab and width, each cache made ready (a slab
    row that holds its new position, `KVCache.ready`); a cache that cannot be in a slab is left out."""
    by: dict[tuple, list[int]] = {}
    for i in candidates:
        if caches[i].ready(pasts[i] + 1, n_head, d_head, dtype):
            by.setdefault((id(caches[i].slab), bucket_end(pasts[i] + 1)), []).append(i)
    groups = []
    for (_, width), members in by.items():
        if len(members) == 1:
            (i,) = members
            groups.append(SlabGroup(caches[i].slab, caches[i].row, caches[i].row + 1, width, members, None, None, None, None,
                                    _tail_mask(width, pasts[i] + 1), (starts[i], pasts[i])))
            continue
        members.sort(key=lambda i: caches[i].row)
        rows = [caches[i].row for i in members]
        lo, hi = rows[0], rows[-1] + 1
        rows_t = torch.tensor(rows)
        lengths = [width] * (hi - lo)  # rows of others: attend to everything (finite, unused)
        for i, r in zip(members, rows):
            lengths[r - lo] = pasts[i] + 1
        mask = torch.arange(width)[None, None, :] >= torch.tensor(lengths)[:, None, None]
        dense = rows == list(range(lo, hi))
        groups.append(SlabGroup(caches[members[0]].slab, lo, hi, width, members, torch.tensor([starts[i] for i in members]),
                                rows_t, torch.tensor([pasts[i] for i in members]), None if dense else rows_t - lo, mask, None))
    return groups


@functools.lru_cache(maxsize=1024)
def _tail_mask(width: int, length: int) -> torch.Tensor:
    """`[1, 1, width]`: True at the positions from `length` on (a lone row's mask in `attend_rows`)."""
    return (torch.arange(width) >= length)[None, None]


def attend_rows(qkv: torch.Tensor, layer: int, g: SlabGroup, z: torch.Tensor) -> None:
    """The decode rows of `g` in one layer: append their k and v `qkv[at, 1:]` to their slab rows, attend
    (softmax(q kᵀ / √D) v over `g.width` positions, those beyond a row's length masked), write their z into
    `z[at]`. qkv `[N, 3, H, D]`, z `[N, H, D]`. A row's numbers depend only on its own q, keys, values and
    width: the products are batched over rows and heads, and a batched product gives each matrix the result it
    gives it alone (tests/test_engine.py), so a sequence gets the same numbers whoever shares its slab."""
    K, V = g.slab.k[layer], g.slab.v[layer]
    R, H, D = g.hi - g.lo, qkv.shape[2], qkv.shape[3]
    if g.one is not None:  # the same products on the same views, with plain indexing (fewer, cheaper calls)
        n, past = g.one
        keys, values = K[g.lo], V[g.lo]  # [H, capacity, D]
        keys[:, past] = qkv[n, 1]
        values[:, past] = qkv[n, 2]
        scores = torch.bmm(qkv[n, 0].view(H, 1, D), keys[:, :g.width].transpose(1, 2)).mul_(D**-0.5)
        scores.masked_fill_(g.mask[0], float("-inf"))
        z[n] = torch.bmm(torch.softmax(scores, dim=-1), values[:, :g.width]).view(H, D)
        return
    K[g.rows, :, g.pos] = qkv[g.at, 1]
    V[g.rows, :, g.pos] = qkv[g.at, 2]
    if g.rel is None:
        q = qkv[g.at, 0]
    else:
        q = qkv.new_zeros(R, H, D)
        q[g.rel] = qkv[g.at, 0]
    keys = K[g.lo:g.hi, :, :g.width].reshape(R * H, g.width, D)  # views of the slab, no copy
    scores = torch.bmm(q.view(R * H, 1, D), keys.transpose(1, 2)).mul_(D**-0.5)
    scores.view(R, H, g.width).masked_fill_(g.mask, float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), V[g.lo:g.hi, :, :g.width].reshape(R * H, g.width, D)).view(R, H, D)
    z[g.at] = out if g.rel is None else out[g.rel]


@functools.lru_cache(maxsize=4)
def causal_bias(n_query: int, n_key: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[query, key]`: 0 where the query (the last n_query positions) may attend, -inf where it may not."""
    return torch.full((n_query, n_key), float("-inf"), device=device, dtype=dtype).triu_(n_key - n_query + 1)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.d_mlp)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.n_embd)
        self.pre, self.post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.post(F.gelu(self.pre(self.c_fc(x)), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.resid_pre, self.attn_out, self.resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.mlp_out, self.resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        x = self.resid_pre(x)
        x = self.resid_mid(x + self.attn_out(self.attn(self.ln_1(x), kv_cache, layer)))
        return self.resid_post(x + self.mlp_out(self.mlp(self.ln_2(x))))


class GPT2(nn.Module):
    """GPT-2 language model with a tied unembedding. `forward(tokens) -> logits [batch, pos, vocab]`."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.embed, self.pos_embed = HookPoint(), HookPoint()
        self.ln_final, self.logits = HookPoint(), HookPoint()
        self.hook_points: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_points[name] = module
        # The module tree is fixed once built (hook names are found in it once, above).
        self._decode_plan = [_block_plan(block) for block in self.blocks]
        self._score_hooks = [hp for block in self.blocks for hp in (block.attn.scores, block.attn.pattern)]
        self._hookable = [m for m in self.modules() if not isinstance(m, HookPoint)]

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def forward(
        self, tokens: torch.Tensor, kv_cache: KVCache | None = None, last_only: bool = False, unembed: bool = True,
        body: str = "auto",
    ) -> torch.Tensor:
        """tokens `[batch, pos]` (ids) -> logits `[batch, pos, vocab]` (`[batch, 1, vocab]` if last_only).

        With a `kv_cache`, `tokens` are the positions after those already in the cache, and
        the cache is extended by them. `unembed=False` stops after the final layer norm and
        returns `[batch, pos, d_model]` (for callers that unembed several rows at once).
        `body`: "modules" calls every module; "flat" runs `_decode_step` (one new position with a
        cache, no attention scores or patterns observed, no PyTorch module hooks); "auto" takes
        "flat" whenever it can. Both compute the same numbers bit for bit (tests/test_model_parity.py).
        """
        tokens = self._check_tokens(tokens)
        past = kv_cache.length if kv_cache is not None else 0
        T = tokens.shape[1]
        if past + T > self.cfg.n_positions:
            raise ContextLengthError(
                f"sequence of {past + T} tokens exceeds the model's context of {self.cfg.n_positions} positions"
            )
        if body not in ("auto", "modules", "flat"):
            raise ValueError(f"body must be 'auto', 'modules' or 'flat', got {body!r}")
        flat_possible = kv_cache is not None and T == 1 and not any(hp.observed for hp in self._score_hooks) and not self._module_hooks()
        if body == "flat" and not flat_possible:
            raise ValueError("the flat decode step reads one new position with a KV cache, with no attention scores or "
                             "patterns observed and no PyTorch module hooks: use body='modules' or 'auto'")
        if flat_possible and body != "modules":
            x = self._decode_step(tokens, kv_cache)
        else:
            positions = torch.arange(past, past + T, device=tokens.device)
            x = self.embed(self.wte(tokens)) + self.pos_embed(self.wpe(positions).expand(tokens.shape[0], T, -1))
            for i, block in enumerate(self.blocks):
                x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = past + T
        x = self.ln_final(self.ln_f(x))
        if last_only:
            x = x[:, -1:]
        return self.logits(self.unembed(x)) if unembed else x

    def _module_hooks(self) -> bool:
        """Whether a PyTorch forward (pre-)hook is registered on a block's module or globally: then decode steps
        take the modules (the flat step calls none of them, so the hook would not fire)."""
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._hookable)

    def _decode_step(self, tokens: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """The blocks for one new position per sequence, `[batch, 1]` -> residual `[batch, 1, d_model]`:
        the modules' operations and hook points, in their order, without the modules' Python.

        At batch 1 a decode step is a chain of matrix-vector products bound by memory bandwidth.
        Between them, every module call and attribute lookup misses the caches that the weights
        have just streamed through: together ~3 ms of a 55 ms gpt2-medium step. Here parameters
        and hook points come from plain dicts and lists. Attention scores and patterns are not
        computed (the fused kernel runs): `forward` takes the modules when they are observed.
        tests/test_model_parity.py holds both paths equal, activation by activation, bit for bit.
        """
        cfg = self.cfg
        B, C, eps = tokens.shape[0], cfg.n_embd, cfg.layer_norm_epsilon
        qkv_shape = (B, 1, 3, cfg.n_head, cfg.d_head)
        past = kv_cache.length
        x = self.embed(F.embedding(tokens, self.wte.weight)) + self.pos_embed(self.wpe.weight[past:past + 1].expand(B, 1, C))
        for layer, (p, hp) in enumerate(self._decode_plan):
            x = hp.resid_pre(x)
            h = F.layer_norm(x, (C,), p.ln_1["weight"], p.ln_1["bias"], eps)
            q, k, v = F.linear(h, p.c_attn["weight"], p.c_attn["bias"]).view(qkv_shape).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = hp.q(q), hp.k(k), hp.v(v)
            k, v = kv_cache.append(layer, k, v)
            z = hp.z(F.scaled_dot_product_attention(q, k, v))
            x = hp.resid_mid(x + hp.attn_out(F.linear(z.transpose(1, 2).reshape(B, 1, C), p.attn_proj["weight"], p.attn_proj["bias"])))
            h = F.layer_norm(x, (C,), p.ln_2["weight"], p.ln_2["bias"], eps)
            h = hp.post(F.gelu(hp.pre(F.linear(h, p.c_fc["weight"], p.c_fc["bias"])), approximate="tanh"))
            x = hp.resid_post(x + hp.mlp_out(F.linear(h, p.mlp_proj["weight"], p.mlp_proj["bias"])))
        return x

    @torch.no_grad()
    def forward_ragged(self, segments: Sequence[torch.Tensor | list[int]], caches: Sequence[KVCache], plans: Sequence | None = None) -> "Ragged":
        """Several sequences in one pass: `segments[i]` `[T_i]` (a tensor or a list) are the ids that follow what `caches[i]`
        already holds (a decode step is T_i = 1, a chunk of a prompt T_i > 1). Every cache is extended.

        The rows of all sequences are stacked, `[N = sum T_i, ...]`, so each weight matrix is read once
        for all of them (at batch 1 a decode step streams every weight to compute one row); attention
        runs per sequence over its own cache, as `forward` does. The matrix products use weights
        packed once for oneDNN (`packed_linear`), whose result for a row does not depend on the other
        rows: a sequence gets the same numbers bit for bit whoever it is batched with.
        No hook point runs here (hooks belong to the thread that attached them); a sequence's
        interventions travel with it instead: `plans[i]` (an `interventions.Plan` or None) makes its
        edits at the same places as the hook points of `forward`.
        Returns the final-layer-normed rows (`unembed_rows` reads them out) and the captures a recording
        session keeps (see `Ragged`). tests/test_engine.py holds it equal to `forward`.
        """
        cfg = self.cfg
        C, H, D, eps = cfg.n_embd, cfg.n_head, cfg.d_head, cfg.layer_norm_epsilon
        if self._module_hooks():
            raise RuntimeError("forward_ragged runs no nn.Module hooks: remove them, or use hook points (forward) or interventions")
        lengths = [len(t) for t in segments]
        pasts = [kv.length for kv in caches]
        for past, T in zip(pasts, lengths):
            if T == 0 or past + T > cfg.n_positions:
                raise ContextLengthError(f"a segment of {T} tokens after {past} does not fit the context of {cfg.n_positions}")
        # All segments' ids and positions as one tensor each, checked once (a few calls a pass, not a few a sequence)
        if all(isinstance(t, torch.Tensor) for t in segments):
            flat = torch.cat([t.reshape(-1) for t in segments])
        else:
            flat = torch.as_tensor([int(i) for t in segments for i in (t.tolist() if isinstance(t, torch.Tensor) else t)], dtype=torch.long)
        tokens = self._check_tokens(flat)[0]  # [N]
        N = int(tokens.shape[0])
        positions = torch.tensor([p for past, T in zip(pasts, lengths) for p in range(past, past + T)], device=tokens.device)
        embed, pos_embed = F.embedding(tokens, self.wte.weight), F.embedding(positions, self.wpe.weight)
        bounds = [0]
        for T in lengths:
            bounds.append(bounds[-1] + T)
        plans = list(plans) if plans is not None else [None] * len(segments)
        edited = [i for i, plan in enumerate(plans) if plan]

        def edit(name: str, rows: torch.Tensor) -> torch.Tensor:
            """rows `[N, width]` (a fresh result, changed in place) after each sequence's edits at hook point `name`."""
            for i in edited:
                if name in plans[i].edits:
                    rows[bounds[i]:bounds[i + 1]] = plans[i].apply(name, rows[None, bounds[i]:bounds[i + 1]], pasts[i])[0]
            return rows

        if edited:
            embed, pos_embed = edit("embed", embed), edit("pos_embed", pos_embed)
        x = embed + pos_embed  # [N, C]
        x = edit("blocks.0.resid_pre", x) if edited else x
        resid = [x]
        packed = self._packed_weights()
        # Decode rows whose caches share a slab append and attend together (`attend_rows`); the others (prompt
        # chunks, sequences with interventions, caches off the CPU) one by one.
        on_cpu = x.device.type == "cpu"
        groups = slab_groups(caches, pasts, bounds, H, D, x.dtype, [i for i, T in enumerate(lengths) if T == 1 and not plans[i]]) if on_cpu else []
        grouped = {i for g in groups for i in g.members}
        alone = [i for i in range(len(segments)) if i not in grouped]
        for layer, (p, _) in enumerate(self._decode_plan):
            w_attn, w_proj, w_fc, w_mlp = packed[layer]
            name = f"blocks.{layer}."
            qkv = packed_linear(F.layer_norm(x, (C,), p.ln_1["weight"], p.ln_1["bias"], eps), w_attn, p.c_attn["bias"]).view(N, 3, H, D)
            z_all = qkv.new_empty(N, H, D)
            for g in groups:
                attend_rows(qkv, layer, g, z_all)
            heads = qkv.permute(1, 2, 0, 3) if alone else None  # [3, H, N, D]
            for i in alone:
                kv, past, T, plan = caches[i], pasts[i], lengths[i], plans[i]
                q, k, v = heads[:, :, bounds[i]:bounds[i + 1]].unbind(0)  # (H, T, D)
                if plan:
                    k, v = plan.apply(name + "attn.k", k[None], past)[0], plan.apply(name + "attn.v", v[None], past)[0]
                k, v = kv.extend(layer, k, v)  # (H, S, D)
                if T == 1:
                    z = attend_one(q, k, v)
                elif past == 0:
                    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:
                    z = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_bias(T, past + T, x.device, q.dtype))
                if plan:
                    z = plan.apply(name + "attn.z", z[None], past)[0]
                z_all[bounds[i]:bounds[i + 1]] = z.transpose(0, 1)
            a = packed_linear(z_all.view(N, C), w_proj, p.attn_proj["bias"])
            if not edited:
                x = x + a
                h = F.gelu(packed_linear(F.layer_norm(x, (C,), p.ln_2["weight"], p.ln_2["bias"], eps), w_fc, p.c_fc["bias"]),
                           approximate="tanh")
                x = x + packed_linear(h, w_mlp, p.mlp_proj["bias"])
            else:
                x = edit(name + "resid_mid", x + edit(name + "attn_out", a))
                h = packed_linear(F.layer_norm(x, (C,), p.ln_2["weight"], p.ln_2["bias"], eps), w_fc, p.c_fc["bias"])
                h = edit(name + "mlp.post", F.gelu(edit(name + "mlp.pre", h), approximate="tanh"))
                x = edit(name + "resid_post", x + edit(name + "mlp_out", packed_linear(h, w_mlp, p.mlp_proj["bias"])))
            resid.append(x)
        for kv, past, T in zip(caches, pasts, lengths):
            kv.length = past + T
        return Ragged(bounds, self.ln_f(x), torch.stack(resid), embed, pos_embed)

    @torch.no_grad()
    def unembed_rows(self, normed: torch.Tensor) -> torch.Tensor:
        """`[n, d_model]` final-layer-normed rows -> logits `[n, vocab]` through the packed unembedding
        (a row's logits do not depend on the other rows; `forward_ragged`'s companion)."""
        return packed_linear(normed, self._packed_weights()[-1], None)

    def _packed_weights(self) -> list:
        """Per block the packed c_attn, attn c_proj, c_fc, mlp c_proj weights, then the unembedding;
        rebuilt whenever a weight changes (`packed_linear`)."""
        weights = [m.weight for b in self.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        weights.append(self.wte.weight)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        cached = self.__dict__.get("_packed_cache")
        if cached is None or cached[0] != key:
            flat = [pack_linear_weight(w.detach()) for w in weights]
            self.__dict__["_packed_cache"] = cached = (key, [tuple(flat[4 * i:4 * i + 4]) for i in range(self.cfg.n_layer)] + [flat[-1]])
        return cached[1]

    def unembed(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer-normed residual `[..., d_model]` -> logits `[..., vocab]` (tied to the token embedding).

        Outside autograd this multiplies by a cached `[d_model, vocab]` copy of the embedding:
        on CPU, `x @ W.T` with W stored transposed is 10-20% faster for the few rows of a decode
        step than F.linear or `W @ x.T` (the unembedding is a quarter of gpt2's weights).
        `out` (`[rows, vocab]`, outside autograd only) receives the logits of a 2-D `x`: reusing
        one buffer spares the page faults of a fresh 100 MB result per call.
        """
        w = self.wte.weight
        if torch.is_grad_enabled() and w.requires_grad:
            if out is not None:
                raise ValueError("unembed(out=...) is for inference only (no autograd)")
            return F.linear(x, w)
        if out is not None:
            return torch.mm(x, self._unembed_weight(), out=out)
        return (x.reshape(-1, x.shape[-1]) @ self._unembed_weight()).view(*x.shape[:-1], w.shape[0])

    def _unembed_weight(self) -> torch.Tensor:
        """The token embedding transposed, `[d_model, vocab]`, rebuilt whenever the embedding changes."""
        w = self.wte.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self.__dict__.get("_unembed_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                self.__dict__["_unembed_cache"] = cached = (key, w.detach().t().contiguous())
        return cached[1]

    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(tokens, dtype=torch.long)
        tokens = tokens.to(self.wte.weight.device)  # a no-op where they already are
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError(f"tokens must be integer ids shaped [batch, pos], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens is empty: at least one token is needed")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return tokens.long()

    # --- hooks -----------------------------------------------------------------------------

    def _match(self, spec) -> list[HookPoint]:
        if callable(spec) and not isinstance(spec, (str, tuple)):
            return [hp for name, hp in self.hook_points.items() if spec(name)]
        name = resolve_name(spec, self.cfg.n_layer)
        if name not in self.hook_points:
            close = difflib.get_close_matches(name, list(self.hook_points), n=3)
            raise KeyError(f"no hook point named {name!r}" + (f"; did you mean {close}?" if close else ""))
        return [self.hook_points[name]]

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[object, HookFn]]) -> Iterator["GPT2"]:
        """Run `fn(activation, hook)` at the named hook points inside the block.

        A name is a full name (`"blocks.3.attn.pattern"`), a `(short, layer)` tuple
        (`("pattern", -1)`) or a predicate on full names. A hook that returns a tensor
        replaces the activation. All hooks are removed when the block exits, also on error.
        """
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for spec, fn in fwd_hooks:
                for hp in self._match(spec):
                    hp.fns.append(fn)
                    added.append((hp, fn))
            yield self
        finally:
            for hp, fn in reversed(added):
                for i in range(len(hp.fns) - 1, -1, -1):
                    if hp.fns[i] is fn:
                        del hp.fns[i]
                        break

    def run_with_cache(
        self,
        tokens: torch.Tensor,
        names: Sequence | Callable[[str], bool] | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        fwd_hooks: Iterable[tuple[object, HookFn]] = (),
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Forward pass that saves activations: `(logits, cache)`.

        `names`: None for every hook point, a list of full names / `(short, layer)` tuples /
        short per-layer names such as `"pattern"` (all layers), or a predicate on full names.
        `fwd_hooks` run as well (they see and may change activations before they are saved).
        """
        acts: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            acts[hook.name] = x.detach()

        specs: list = []
        if names is None:
            specs = [lambda _name: True]
        elif callable(names):
            specs = [names]
        else:
            for n in names:
                if isinstance(n, str) and n not in self.hook_points and "." not in n:
                    specs += [(n, layer) for layer in range(self.cfg.n_layer)]
                else:
                    specs.append(n)
        with torch.no_grad(), self.hooks(list(fwd_hooks) + [(s, save) for s in specs]):
            logits = self(tokens, kv_cache=kv_cache, last_only=last_only)
        return logits, ActivationCache(acts, self.cfg.n_layer)

    def reset_hooks(self) -> None:
        for hp in self.hook_points.values():
            hp.fns.clear()

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device


@dataclass
class Ragged:
    """What `GPT2.forward_ragged` computed; sequence i owns rows `bounds[i]:bounds[i + 1]`."""

    bounds: list[int]
    normed: torch.Tensor  # [N, d_model] after the final layer norm
    resid: torch.Tensor  # [layer + 1, N, d_model]: after the embeddings, after each block
    embed: torch.Tensor  # [N, d_model] token embedding
    pos_embed: torch.Tensor  # [N, d_model] position embedding

    def rows(self, i: int) -> slice:
        return slice(self.bounds[i], self.bounds[i + 1])


class BlockParams(NamedTuple):
    """A block's live parameter dicts (`module._parameters`: nn.Module.__getattr__ is a Python call per
    lookup; a reassigned parameter shows up in these dicts)."""

    ln_1: dict[str, torch.Tensor]
    c_attn: dict[str, torch.Tensor]
    attn_proj: dict[str, torch.Tensor]  # attn.c_proj
    ln_2: dict[str, torch.Tensor]
    c_fc: dict[str, torch.Tensor]
    mlp_proj: dict[str, torch.Tensor]  # mlp.c_proj


class BlockHooks(NamedTuple):
    """A block's hook points, in the order the modules run them."""

    resid_pre: HookPoint
    q: HookPoint
    k: HookPoint
    v: HookPoint
    z: HookPoint
    attn_out: HookPoint
    resid_mid: HookPoint
    pre: HookPoint
    post: HookPoint
    mlp_out: HookPoint
    resid_post: HookPoint


class BlockPlan(NamedTuple):
    """What the flat bodies (`GPT2._decode_step`, `GPT2.forward_ragged`) read of a block."""

    params: BlockParams
    hooks: BlockHooks


def _block_plan(block: Block) -> BlockPlan:
    attn, mlp = block.attn, block.mlp
    params = BlockParams(*(m._parameters for m in (block.ln_1, attn.c_attn, attn.c_proj, block.ln_2, mlp.c_fc, mlp.c_proj)))
    hooks = BlockHooks(block.resid_pre, attn.q, attn.k, attn.v, attn.z, block.attn_out, block.resid_mid, mlp.pre, mlp.post,
                       block.mlp_out, block.resid_post)
    return BlockPlan(params, hooks)


def init_weights(model: GPT2, seed: int = 0, std: float = 0.02) -> GPT2:
    """GPT-2's initialisation (normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * model.cfg.n_layer) if name.endswith("c_proj.weight") else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model
