"""What :mod:`qcompile.backends.triton.decode_attention`'s kernel takes: the limits of its
tiles, the cache write it can fold in (:class:`CacheWrite`), and :func:`kernel_fits`, which
says in words why given inputs do not fit (the ``qcompile::`` ops fall back to their
reference on it; the wrapper raises it), and :func:`broadcast_strides`, how the kernel reads a
table that broadcasts. Shapes and dtypes only: a decode step calls these per layer, so they read plain ints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CACHE_DTYPES", "MAX_GROUP", "MAX_HEAD_DIM", "MAX_HEAD_DIM_FP32", "CacheWrite",
           "broadcast_strides", "kernel_fits"]

CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256  # a [16, 256] query tile and [BLOCK_L, 256] key tile stay in registers
MAX_HEAD_DIM_FP32 = 128  # fp32 tiles of 256 spilled in every config (offline sm_90 compile)
MAX_GROUP = 64  # query heads per kv head held by one program


@dataclass(frozen=True)
class CacheWrite:
    """The new key/value row a decode step writes into its cache before attending, as
    ``k.index_copy_(2, index, rope(k_new, k_cos, k_sin))`` and ``v.index_copy_(2, index,
    v_new)`` would (without ``k_cos``/``k_sin``: ``k_new`` as it is).

    Attributes:
        index: ``[1]`` integer position in the cache.
        k_new: ``[B, Hkv, 1, DK]``, the cache's dtype.
        v_new: ``[B, Hkv, 1, DV]``.
        k_cos, k_sin: Rotary tables broadcastable to ``k_new``, or None.
    """

    index: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cos: torch.Tensor | None = None
    k_sin: torch.Tensor | None = None


def _broadcasts(shape: tuple, target: tuple) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it (plain ints: a decode
    step calls this per layer, and ``torch.broadcast_shapes`` took 12 us a call)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t
               for s, t in zip(reversed(shape), reversed(target), strict=False))


def _table_problem(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> str | None:
    if t.dtype != dtype or t.dim() > 4:
        return f"{name} must be in the cache's dtype with at most 4 dims, got {t.dtype} " \
               f"{t.dim()}-D"
    if not _broadcasts(t.shape, shape):
        return f"{name} {tuple(t.shape)} does not broadcast to {shape}"
    if shape[-1] % 2:
        return f"rotary tables need an even head_dim, got {shape[-1]}"
    return None


def _write_problem(w: CacheWrite, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if (w.k_cos is None) != (w.k_sin is None):
        return "give both k_cos and k_sin or neither"
    if w.index.dim() != 1 or w.index.numel() != 1 or w.index.dtype not in (torch.int64,
                                                                           torch.int32):
        return f"index must be one int32/int64 position, got {w.index.dtype} " \
               f"{tuple(w.index.shape)}"
    b, hkv = k.shape[:2]
    for name, t, ref in (("k_new", w.k_new, k), ("v_new", w.v_new, v)):
        want = (b, hkv, 1, ref.shape[3])
        if tuple(t.shape) != want or t.dtype != ref.dtype:
            return f"{name} must be {want} {ref.dtype}, got {tuple(t.shape)} {t.dtype}"
    for name, t in (("k_cos", w.k_cos), ("k_sin", w.k_sin)):
        if t is not None and (why := _table_problem(name, t, k.dtype, tuple(w.k_new.shape))):
            return why
    return None


def kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, write: CacheWrite | None = None) -> str | None:
    """Why the kernel cannot take these inputs (None: it can). Shapes and dtypes only."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D [batch, heads, rows, head_dim]"
    if q.shape[2] != 1:
        return f"{q.shape[2]} query rows (the kernel takes one: a decode step)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in CACHE_DTYPES:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: one of bf16/fp16/fp32 needed"
    b, hq, _, dk = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        return f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}"
    if k.shape[3] != dk:
        return f"k head_dim {k.shape[3]} differs from q's {dk}"
    if k.shape[1] == 0 or hq % k.shape[1]:
        return f"{hq} query heads are not a multiple of {k.shape[1]} kv heads"
    if hq // k.shape[1] > MAX_GROUP:
        return f"{hq // k.shape[1]} query heads per kv head (at most {MAX_GROUP})"
    if max(dk, v.shape[3]) > MAX_HEAD_DIM:
        return f"head_dim {max(dk, v.shape[3])} (at most {MAX_HEAD_DIM})"
    if q.dtype == torch.float32 and max(dk, v.shape[3]) > MAX_HEAD_DIM_FP32:
        return f"fp32 head_dim {max(dk, v.shape[3])} (at most {MAX_HEAD_DIM_FP32})"
    if k.shape[2] == 0:
        return "an empty cache"
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return f"mask dtype {mask.dtype} (boolean or floating point)"
        if mask.dim() > 4:
            return f"a {mask.dim()}-D mask"
        if not _broadcasts(mask.shape, (b, hq, 1, k.shape[2])):
            return f"mask {tuple(mask.shape)} does not broadcast to {(b, hq, 1, k.shape[2])}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (why := _table_problem(name, t, q.dtype, (b, hq, 1, dk))):
            return why
    return None if write is None else _write_problem(write, k, v)


def broadcast_strides(t: torch.Tensor | None, shape: tuple, dummy: torch.Tensor
                      ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` and its (batch, head, last) strides as broadcast to ``shape`` ``[B, H, 1, D]``
    (0 along broadcast dims; no ``expand``, 1.3 us a call); a dummy pointer and zero strides
    for None. ``t`` must broadcast to ``shape`` (:func:`kernel_fits`)."""
    if t is None:
        return dummy, (0, 0, 0)
    lead = len(shape) - t.dim()
    st = [0] * lead + [0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim())]
    return t, (st[0], st[1], st[3])
