"""The decode attention's host work, done once per call shape and cache-length bucket.

A ``qcompile::decode_attention`` call (or ``decode_attention_write``) checks a dozen shapes
and dtypes, looks up its run count (a timed choice), works out the broadcast strides of the
mask and the rotary tables and launches a kernel of 53 arguments through the autotuner's key
and Triton's binder. With a stand-in driver on a 2-core CPU that was 64-93 us per call
(``benchmarks/host_overhead.py --device fake-cuda --m 1``), more than a batch-1 GEMV's whole
call once it has its plan (:mod:`~qcompile.backends.triton.gemv_plan`). Without CUDA graphs
(``generate()`` with a dynamic cache) a decode step pays it in every layer.

Between two decode steps only the tensors and the cache length change: a dynamic cache is a
new tensor one position longer, so its length and its strides (and an attention mask's) move
with it. Everything else the launch takes - the heads, head dims, the scale, the tables'
strides, the run count, the config, the compiled kernel - is fixed by the call's shapes,
strides and dtypes without the length, and by the length's bucket (its 64-position blocks
rounded up to a power of two, where the run count is chosen). So a key of those keeps the
prepared launch (:func:`~qcompile.backends.triton.launch.prepare`), and a call passes its
tensors, its length and the length's strides; a length whose specialization class differs
(divisibility by 16) goes through Triton's binder for that call
(:class:`~qcompile.backends.triton.launch.Prepared`).

A key's launch is recorded at its second call (the first chooses the run count on a GPU, and
would record the timed candidates' launches too), never while a CUDA graph is captured, and
after :data:`TRIES` recordings that cannot be prepared the key stays on the full path. The
full path checks every call the plan does not answer and raises the errors; a call the plan
answers is checked for the one thing the length can break (``v`` and a mask with the same
length as ``k``). At most :data:`MAX_KEYS` keys are kept (the oldest go first). A prepared
launch holds no call's tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from qcompile.backends.triton import runtime
from qcompile.backends.triton.decode_attention_inputs import CacheWrite, broadcast_strides
from qcompile.backends.triton.launch import Prepared, prepare_call, record_second_call

__all__ = ["MAX_KEYS", "TRIES", "clear", "plans", "run"]

#: Recordings of a key's launch before it stays on the full path.
TRIES = 3
#: Call shapes (with their length bucket) kept.
MAX_KEYS = 64
_PLANS: dict[tuple, _Attention | int] = {}
# The kernel's per-call arguments: tensors, then the length and its strides.
_TENSORS = ("q_ptr", "k_ptr", "v_ptr", "mask_ptr", "cos_ptr", "sin_ptr", "out_ptr", "part_ptr",
            "ml_ptr", "count_ptr", "idx_ptr", "kn_ptr", "vn_ptr", "kcos_ptr", "ksin_ptr")
_INTS = ("L", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l", "sm_b", "sm_h", "sm_l")


class _Attention:
    """A key's prepared launch and the per-call buffers' sizes."""

    __slots__ = ("ready", "dv", "part", "ml", "counts")

    def __init__(self, ready: Prepared, dv: int, part: int, ml: int,
                 counts: torch.Tensor | None) -> None:
        self.ready, self.dv = ready, dv
        self.part, self.ml = part, ml  # fp32 elements of the partials (0: one run, none)
        self.counts = counts  # the device's arrival counts (None: one run, out stands in)


def clear() -> None:
    """Forget every plan (tests)."""
    _PLANS.clear()


def plans() -> int:
    """How many keys have a prepared launch (tests, reports)."""
    return sum(isinstance(v, _Attention) for v in _PLANS.values())


def _sig(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
         write: CacheWrite | None) -> tuple:
    """Everything the launch depends on but the tensors' memory, the cache length and the
    strides that move with it."""
    n = k.shape[2]
    return (_sig(q), k.shape[:2], k.shape[3], k.stride(3), k.dtype, k.device, v.shape[:2],
            v.shape[3], v.stride(3), v.dtype, v.device,
            triton.next_power_of_2(-(-n // 64)) if n else -1,
            None if mask is None else (mask.dtype, mask.device, mask.shape[:-1]),
            _sig(cos), _sig(sin),
            None if write is None else tuple(_sig(t) for t in (
                write.index, write.k_new, write.v_new, write.k_cos, write.k_sin)),
            scale, runtime.ATTN_PDL)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        scale: float | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
        write: CacheWrite | None, full: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One decode attention call through its key's prepared launch, or ``full()`` (the op's
    checked full path for these arguments) where there is none yet (module docstring)."""
    key = _key(q, k, v, mask, scale, cos, sin, write)
    hit = _PLANS.get(key)
    if isinstance(hit, _Attention):
        n = k.shape[2]
        if v.shape[2] == n and (mask is None or mask.shape[-1] in (1, n)):
            return _relaunch(hit, q, k, v, mask, cos, sin, write)
        return full()  # lengths that disagree: the full path names them
    return record_second_call(_PLANS, key, MAX_KEYS, TRIES, full, _build,
                              q.is_cuda and torch.cuda.is_current_stream_capturing())


def _relaunch(hit: _Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
              write: CacheWrite | None) -> torch.Tensor:
    b, hq = q.shape[0], q.shape[1]
    n = k.shape[2]
    dev = q.device
    out = torch.empty((b, hq, 1, hit.dv), dtype=q.dtype, device=dev)
    if hit.part:
        part = torch.empty((hit.part,), dtype=torch.float32, device=dev)
        ml = torch.empty((hit.ml,), dtype=torch.float32, device=dev)
    else:
        part = ml = out
    mptr, (sm_b, sm_h, sm_l) = broadcast_strides(mask, (b, hq, 1, n), q)
    sk_b, sk_h, sk_l, _ = k.stride()
    sv_b, sv_h, sv_l, _ = v.stride()
    w = (q, q, q, q, q) if write is None else (
        write.index, write.k_new, write.v_new, q if write.k_cos is None else write.k_cos,
        q if write.k_sin is None else write.k_sin)
    hit.ready(q_ptr=q, k_ptr=k, v_ptr=v, mask_ptr=mptr, cos_ptr=q if cos is None else cos,
              sin_ptr=q if sin is None else sin, out_ptr=out, part_ptr=part, ml_ptr=ml,
              count_ptr=out if hit.counts is None else hit.counts, idx_ptr=w[0], kn_ptr=w[1],
              vn_ptr=w[2], kcos_ptr=w[3], ksin_ptr=w[4], L=n, sk_b=sk_b, sk_h=sk_h,
              sk_l=sk_l, sv_b=sv_b, sv_h=sv_h, sv_l=sv_l, sm_b=sm_b, sm_h=sm_h, sm_l=sm_l)
    return out


def _build(calls: list[tuple], out: torch.Tensor) -> _Attention | None:
    """The recorded call's launch with its per-call arguments let go, or None where it made
    another number of launches or one that cannot be prepared."""
    if len(calls) != 1:
        return None
    ready = prepare_call(calls[0])
    if ready is None or not set(_TENSORS) <= ready.slots.keys():
        return None
    values = {name: ready.values[ready.positions[name]] for name in ("part_ptr", "ml_ptr",
                                                                       "count_ptr")}
    split = values["part_ptr"].data_ptr() != out.data_ptr()
    counts = values["count_ptr"] if split else None
    if split and counts.data_ptr() == out.data_ptr():
        return None
    return _Attention(ready.vary(*_TENSORS, *_INTS), out.shape[3],
                      values["part_ptr"].numel() if split else 0,
                      values["ml_ptr"].numel() if split else 0, counts)
