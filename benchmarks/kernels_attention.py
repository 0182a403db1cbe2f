"""Decode attention kernel vs what the unlowered decode graph runs (CUDA).

Llama-3-8B's attention at batch 1 (32 query heads over 8 kv heads, head_dim 128, bf16), one
query row over a static cache of ``cache_len`` positions of which the first ``live`` are
attended (the boolean prefix mask a static cache gets). Timed in one run, each on a cold L2
(:func:`qcompile.backends.triton.cold_bench.cold_times`, median; hot ``do_bench`` where a
call cannot be captured in a CUDA graph, marked ``cold: false``), as in a decode step, where
the other layers' weights have evicted the cache:

* ``graph``: ``repeat_kv`` then SDPA with the mask, compiled by Inductor (what a decode
  graph without ``decode_attention`` computes: per-query-head copies of the cache, then an
  attention kernel);
* ``sdpa_gqa``: PyTorch's SDPA with ``enable_gqa=True`` (no copies), eager;
* ``decode_attention``: :func:`qcompile.backends.triton.decode_attention.decode_attention`;

and the whole attention of a decode step, from the fused q/k/v projection's output:

* ``graph_step``: rotary embeddings of q and k, the two ``index_copy_`` cache writes,
  ``repeat_kv`` and SDPA, compiled by Inductor (the unlowered decode graph's part);
* ``decode_attention_write``: the op ``lower-triton`` puts in its place (one kernel).

Each row has ``us``, ``ratio_vs_graph`` (``graph``'s or ``graph_step``'s time over this one)
and ``gbps``: the bytes of the live keys and values over the time (what a step must read); the
kernel's rows also ``picked``: its autotuned config and the run counts' cold times.

Usage::

    python benchmarks/kernels_attention.py
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
#: (cache_len, live): the decode benchmark's short cache (benchmarks/decode.py: a 16-token
#: prompt and 64 new tokens), full caches of three lengths and a long static cache
#: one-eighth used.
CASES = ((81, 81), (512, 512), (2048, 2048), (8192, 8192), (8192, 1024))


def _picked(cache_len: int, write: bool) -> dict[str, Any]:
    """What the kernel ran with for the last call: the autotuner's config (positions per
    block, warps, how far ahead it loads) and each run count's cold time for this shape."""
    from qcompile.backends.triton import decode_attention as da
    from qcompile.backends.triton import path_tuning

    cfg = getattr(da._decode_attn_tuned, "best_config", None)
    out: dict[str, Any] = {"config": None if cfg is None else
                           {**cfg.kwargs, "num_warps": cfg.num_warps}}
    for key, notes in path_tuning.timings().items():
        if key[0] == "decode-attention" and key[6] == cache_len and key[-1] == write:
            out["splits_us"] = notes
    return out


def _time(fn) -> tuple[float, bool]:
    """Median µs of ``fn`` on a cold L2, or hot if it cannot be captured; (µs, cold)."""
    from qcompile.backends.triton.cold_bench import cold_us

    return cold_us(fn)


def _step_ref(q, k_new, v_new, k, v, index, cos, sin, mask):
    """A decode step's attention as the unlowered graph computes it (module docstring)."""
    from qcompile.backends.triton.ops import decode_attention_ref, rope

    k.index_copy_(2, index, rope(k_new, cos, sin))
    v.index_copy_(2, index, v_new)
    return decode_attention_ref(rope(q, cos, sin), k, v, mask)


def _ways(graph, step, q, k, v, mask, new) -> dict[str, Any]:
    """The calls timed per case (module docstring), by name; ``new`` holds the step's
    ``(k_new, v_new, index, cos, sin)``."""
    import torch.nn.functional as F

    k_new, v_new, index, cos, sin = new
    return {
        "graph": lambda: graph(q, k, v, mask),
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           enable_gqa=True),
        "decode_attention": lambda: torch.ops.qcompile.decode_attention(q, k, v, mask),
        "graph_step": lambda: step(q, k_new, v_new, k, v, index, cos, sin, mask),
        "decode_attention_write": lambda: torch.ops.qcompile.decode_attention_write(
            q, k, v, index, k_new, v_new, mask, None, False, cos, sin, cos, sin),
    }


def run(log=None) -> list[dict[str, Any]]:
    """Time every way per case (module docstring); one dict per (case, way).

    Args:
        log: A text stream each row is written to as one JSON line as soon as it is timed
            (a run cut off by a time limit keeps what it measured), or None.

    Raises:
        RuntimeError: No CUDA device (the interpreter would time Python, not the kernel).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/kernels_attention.py needs a CUDA GPU: the Triton "
                           "interpreter on CPU measures Python overhead, not the kernel")
    from qcompile.backends.triton.ops import decode_attention_ref

    graph = torch.compile(decode_attention_ref, dynamic=False)
    step = torch.compile(_step_ref, dynamic=False)
    device = torch.cuda.get_device_name()
    rows = []
    for cache_len, live in CASES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", generator=gen).bfloat16()
        k, v = (torch.randn(1, KV_HEADS, cache_len, HEAD_DIM, device="cuda",
                            generator=gen).bfloat16() for _ in range(2))
        mask = (torch.arange(cache_len, device="cuda") < live).view(1, 1, 1, cache_len)
        ang = torch.arange(HEAD_DIM, device="cuda").view(1, 1, 1, -1) * 0.01 * live
        new = (*(torch.randn(1, KV_HEADS, 1, HEAD_DIM, device="cuda", generator=gen)
                 .bfloat16() for _ in range(2)),
               torch.tensor([live - 1], device="cuda"), ang.cos().bfloat16(),
               ang.sin().bfloat16())
        ways = _ways(graph, step, q, k, v, mask, new)
        want = decode_attention_ref(q.float(), k.float(), v.float(), mask)
        want_step = _step_ref(q.float(), new[0].float(), new[1].float(), k.float(), v.float(),
                              new[2], new[3].float(), new[4].float(), mask)
        live_bytes = live * KV_HEADS * 2 * HEAD_DIM * 2
        base = None
        for name, fn in ways.items():
            ref = want_step if name in ("graph_step", "decode_attention_write") else want
            err = (fn().float() - ref).abs().max().item()
            us, cold = _time(fn)
            base = us if name in ("graph", "graph_step") else base
            rows.append({"op": "decode_attention", "way": name, "cache_len": cache_len,
                         "live": live, "heads": HEADS, "kv_heads": KV_HEADS,
                         "head_dim": HEAD_DIM, "dtype": "bfloat16", "us": us, "cold": cold,
                         "ratio_vs_graph": base / us, "gbps": live_bytes / us / 1e3,
                         "max_abs_err": err, "device": device})
            if name.startswith("decode_attention"):
                rows[-1]["picked"] = _picked(cache_len, name == "decode_attention_write")
            if log is not None:
                print(json.dumps(rows[-1]), file=log, flush=True)
    return rows


if __name__ == "__main__":
    print(json.dumps(run(log=sys.stderr), indent=1))
