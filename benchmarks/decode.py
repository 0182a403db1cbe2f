"""Batch-1 greedy decode and long prefill: bf16 torch.compile vs ``backend="qcompile"``.

Variants (each on a freshly built random-weight model; values do not change speed):

* ``bf16``: ``torch.compile(model)`` with Inductor, no quantization (the baseline);
* ``w4a16-fp4``: ``backend="qcompile"`` with recipe ``w4-afpq`` (FP4 E2M1 AFPQ weights, g128);
* ``w4a8``: ``backend="qcompile"`` with recipe ``w4a8-m2`` (FP4 weights with ZeroQuant-FP M2
  scales, FP8 activations: the format ``lower-triton`` gives the W4A8 kernel; the AFPQ weights
  of ``w4a8-fp4-fp8`` stay on the reference ops).
* ``w4a16-fp4-unfused`` (only when named): ``w4a16-fp4`` without ``fuse_linears`` (q/k/v and
  gate/up as separate kernels), to measure what the fusion gives.
* ``w4a16-fp4-nodf`` (only when named): ``w4a16-fp4`` without the decode fusions (RMSNorm and
  SiLU gate in front of the GEMVs, residual adds behind them stay Inductor kernels).
* ``w4a16-fp4sym`` (only when named): recipe ``w4-fp4`` (symmetric FP4 E2M1, g128: one sum per
  code where AFPQ has two).
* ``w4a16-fp4sym-head8`` (only when named): recipe ``w4-fp4-head8``, i.e. ``w4a16-fp4sym``
  with the output head in INT8 per channel (``qcompile::w8a16_linear``), where the other
  variants keep it bf16 (or take ``--lm-head``, which quantizes it in the recipe's 4-bit
  format).
* ``w8a16`` (only when named): recipe ``w8a16-int8`` (INT8 per-channel weights everywhere but
  the head; ``--lm-head`` takes the head too).
* ``w4a16-fp4-noattn``, ``w4a16-fp4sym-noattn`` (only when named): without the decode
  attention lowering (the SDPA over per-query-head copies of the cache stays), to measure
  what ``decode_attention`` gives.
* any recipe variant with ``-pdl`` appended (only when named, e.g. ``w4a16-fp4-pdl``): the same
  with the batch-1 GEMVs launched as programmatic dependents (``runtime.GEMV_PDL``,
  :mod:`qcompile.backends.triton.pdl`: each GEMV prefetches its first weight lines while the
  kernel before it finishes). The tiles the autotuner picked for an earlier variant of the same
  shapes are kept, so next to that variant this measures the launch mode alone.
* any recipe variant with ``-apdl`` appended (last; e.g. ``w4a16-fp4sym-pdl-apdl``): the
  decode attention launched as a programmatic dependent too (``runtime.ATTN_PDL``), so the
  ``o_proj`` GEMV after it launches early and prefetches its weights during the attention.
* any variant with ``-combo`` appended (before a ``-pdl``; e.g. ``bf16-combo``,
  ``w4a16-fp4sym-combo-pdl``): compiled with Inductor's ``combo_kernels``, which runs
  independent element-wise kernels of a graph (a decode step's rotary embeddings and KV-cache
  writes) as one launch.

Measured per variant: decode tokens/s (``generate`` of N new tokens minus 1 new token, over
N - 1 tokens, dynamic KV cache), prefill tokens/s (one forward over ``--prefill`` tokens; with
``prefill_host_seconds``, the time until the call returned, which equals the wall time when the
host, not the device, bounds it, and on CUDA ``prefill_allocator_events``: the caching
allocator's device allocations, frees and retries over the timed calls, each a sync, and
``prefill_gc``, Python's garbage collections over them and their time), peak
memory (CUDA: ``max_memory_allocated`` over the whole variant, which includes the bf16 model
before quantization, plus ``resident_bytes_after_compile`` and ``peak_memory_bytes_while_timed``,
what serving needs; CPU: process max RSS, monotonic over the run), and the backend's counters (bytes quantized, freed, compile seconds), with ``host_plans``: how many weights (row
shapes for ``quantize_rows``, batch-1 call shapes for the GEMVs) have a plan that skips their
op's full host path (``w4a16_plan``, ``w4a8_plan``, ``fp8_plan``, ``rows_plan``,
``gemv_plan``). Output is one JSON document,
also written after each variant (``--out``); a variant that raises is recorded with its error
and the rest still run (exit status 1).
``--cache static --mode reduce-overhead`` decodes with a fixed-shape KV cache replayed as CUDA
graphs, which removes the per-kernel launch cost from batch-1 decode. ``--loop direct`` (static
cache only) times a plain greedy loop over the model's forward (argmax on the device, no host
sync until the end, gpt-fast style) instead of ``generate()``, whose per-token host work (logits
processors, stopping checks that sync) is a fixed cost that hides the kernels at a few layers.
``--loop graph`` (static cache, no ``--mode``) captures that loop's step as one CUDA graph by
hand and replays it per token: Inductor's own CUDA graphs skip the step (the cache mutates a
non-buffer tensor), and ``reduce-overhead`` crashed on an H100 (torch 2.11, transformers 5.24).

``--profile`` adds, per variant, each kernel's device time and launches per decode token and
in one long prefill (``benchmarks/step_profile.py``), next to the measured times; on CUDA the
prefill's ``timeline`` says how long the GPU sat idle inside the call, its longest gaps, and
which host ops ran while it waited.

Depth. Compiling all 32 layers does not fit a device session, so runs use ``--layers L``. The
output head (128256 x 4096, bf16 in every variant unless ``--lm-head``) is a fixed cost per
token that a shallow model overweights: at 4 layers it is over a third of the bf16 weight reads,
which caps the quantized speedup near 1.9x where the 32-layer model allows 3x. The head's own
time is measured in the same run (``lm_head_seconds``), and so is all of a step's work outside
the layers (``outside_layers_seconds``: embedding, final norm, head, argmax). Each variant
whose head is bf16 also gets ``decode_tokens_per_s_at_full_depth``: ``(t - t_out) * 32 / L +
t_out`` per token with ``t_out`` that outside time, an extrapolation (linear in layers;
labelled as such), with its ratio to bf16's. A variant whose recipe quantizes the head
(``w4a16-fp4sym-head8``, ``--lm-head``) gets its own ``outside_layers_seconds``: the bf16 one
less the bf16 head, plus its head's lowered op timed alone (``head_seconds``). (Until 2026-11-27 ``t_out`` was the head alone,
which counted the argmax, 38 us per token on an H100, as layer time.)

Usage::

    python benchmarks/decode.py                                   # Llama-3-8B shape on CUDA
    python benchmarks/decode.py --model-shape tiny --device cpu   # anywhere, in about a minute
    python benchmarks/decode.py --layers 4 --prefill 2048 --decode 64 --out decode.json
    python benchmarks/decode.py --layers 4 --cache static --mode reduce-overhead --loop direct
    python benchmarks/decode.py --layers 4 --cache static --loop graph
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rope_theta": 500000.0, "max_position_embeddings": 8192,
    },
    "tiny": {
        "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
        "max_position_embeddings": 4096,
    },
}
VARIANTS: dict[str, str | None] = {"bf16": None, "w4a16-fp4": "w4-afpq", "w4a8": "w4a8-m2",
                                   "w4a16-fp4-unfused": "w4-afpq", "w4a16-fp4-nodf": "w4-afpq",
                                   "w4a16-fp4sym": "w4-fp4", "w4a16-fp4-noattn": "w4-afpq",
                                   "w4a16-fp4sym-noattn": "w4-fp4",
                                   "w4a16-fp4sym-head8": "w4-fp4-head8", "w8a16": "w8a16-int8"}
#: Variants run unless --variants names others.
DEFAULT_VARIANTS = ("bf16", "w4a16-fp4", "w4a8")


def build_model(shape: str, layers: int | None, device: str, dtype: torch.dtype,
                seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama of the given shape (std 0.02 weights), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, tie_word_embeddings=False)
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
    return model.eval()


def with_lm_head(pipeline: str) -> str:
    """``pipeline`` with ``lm_head=true`` in every ``quantize{...}`` (the output head quantized
    like the other linears)."""
    import dataclasses

    from qcompile.pipeline import Pipeline, PipelineStep, parse_pipeline

    return str(Pipeline(tuple(
        PipelineStep(s.name, dataclasses.replace(s.options, lm_head=True))
        if s.name == "quantize" else s for s in parse_pipeline(pipeline))))


def _direct_loop(model: torch.nn.Module, prompt: torch.Tensor, max_new: int,
                 device: str) -> Callable[[int], torch.Tensor]:
    """A greedy decode of ``n`` tokens as plain forward calls over one static KV cache: the
    prompt's forward, then one forward per token, argmax on the device and no host sync until
    the caller's; returns the new tokens. The cache is allocated once (its tensors keep their
    addresses, which CUDA graphs need) and reset before each run."""
    from transformers import StaticCache

    p = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + max_new + 1)
    positions = torch.arange(p + max_new + 1, device=device)

    def run(n: int) -> torch.Tensor:
        cache.reset()
        out = model(prompt, past_key_values=cache, cache_position=positions[:p], use_cache=True)
        toks = [out.logits[:, -1:].argmax(-1)]
        for i in range(n - 1):
            out = model(toks[-1], past_key_values=cache,
                        cache_position=positions[p + i:p + i + 1], use_cache=True)
            toks.append(out.logits[:, -1:].argmax(-1))
        return torch.cat(toks, dim=1)  # the new tokens [1, n]

    return run


def _graph_loop(model: torch.nn.Module, prompt: torch.Tensor, max_new: int,
                device: str) -> Callable[[int], torch.Tensor]:
    """As :func:`_direct_loop`, with the per-token step captured once as a CUDA graph by hand
    (``torch.cuda.graph``) and replayed: no Inductor CUDA-graph trees, which skip a graph whose
    inputs are mutated (transformers' ``StaticCache`` bumps a ``cumulative_length`` tensor) and
    crashed compiling the bf16 model on an H100. The step reads the current token and position
    from device buffers and writes the next ones back, so every replay is the same graph. Off
    CUDA the step runs eagerly (same code, no capture)."""
    from transformers import StaticCache

    p = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + max_new + 1)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    new = torch.zeros(1, max_new, dtype=torch.long, device=device)

    def prefill() -> None:
        cache.reset()
        out = model(prompt, past_key_values=cache,
                    cache_position=torch.arange(p, device=device), use_cache=True)
        tok.copy_(out.logits[:, -1:].argmax(-1))
        new[:, :1].copy_(tok)
        pos.fill_(p)

    def step() -> None:
        out = model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
        tok.copy_(out.logits[:, -1:].argmax(-1))
        new.index_copy_(1, pos - (p - 1), tok)  # token i + 1 of the new ones at position p + i
        pos.add_(1)

    replay, captured = step, None
    if device.startswith("cuda"):
        prefill()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, autotunes) off the capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            replay, captured = graph.replay, True
        except Exception as exc:  # e.g. a host sync in the step: time it uncaptured
            captured = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"decode.py: CUDA-graph capture failed, timing the step eagerly: {captured}",
                  file=sys.stderr)
            torch.cuda.synchronize()

    def run(n: int) -> torch.Tensor:
        prefill()
        for _ in range(n - 1):
            replay()
        return new[:, :n]

    run.cuda_graph = captured  # True, the capture's error, or None off CUDA
    return run


def head_seconds(shape: str, device: str, dtype: torch.dtype, repeats: int = 50,
                 whole: bool = False) -> float:
    """Time of the output head alone for one token: ``linear(x[1, H], W[V, H])`` in ``dtype``
    (CUDA: replays of a CUDA graph, as the decode step runs it under ``reduce-overhead``;
    elsewhere the best of ``repeats`` calls). ``whole``: all of a greedy step's work outside
    the layers, as the loops run it - the embedding lookup, the final RMSNorm, the head and
    the argmax over the vocabulary (the argmax alone took 38 us per token on an H100, a tenth
    of the head)."""
    cfg = SHAPES[shape]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    w = torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    if whole:
        emb = torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02
        norm_w = torch.ones(hidden, device=device, dtype=dtype)
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)

        def fn() -> torch.Tensor:
            h = torch.nn.functional.embedding(tok, emb).float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            logits = torch.nn.functional.linear(norm_w * h.to(dtype), w)
            return logits.argmax(-1)
    else:
        def fn() -> torch.Tensor:
            return torch.nn.functional.linear(x, w)
    if device.startswith("cuda"):
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=100) * 1e-3
    fn()
    return _timed(fn, device, repeats)


def head_format(pipeline: str) -> str | None:
    """The weight format ``pipeline`` gives the output head: the ``w`` of its last
    ``quantize`` with ``lm_head=true`` (None: the head stays in the model's dtype)."""
    from qcompile.pipeline import parse_pipeline

    fmts = [s.options.w for s in parse_pipeline(pipeline)
            if s.name == "quantize" and s.options.lm_head and s.options.w]
    return fmts[-1] if fmts else None


def quantized_head_seconds(fmt: str, shape: str, device: str, dtype: torch.dtype,
                           repeats: int = 50) -> float | None:
    """Time of the output head as the lowered op a ``fmt`` head becomes for one token
    (``qcompile::w4a16_linear`` or ``w8a16_linear``; timed as :func:`head_seconds` times the
    bf16 head), or None for a format with neither."""
    from qcompile.formats import pack_codes, parse_format, quantize

    spec = parse_format(fmt)
    bits = spec.element.bits
    if bits not in (4, 8) or spec.granularity not in ("group", "channel"):
        return None
    cfg = SHAPES[shape]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    q = quantize(torch.randn(vocab, hidden, device=device) * 0.02, spec)
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    ops = torch.ops.qcompile
    if bits == 8:
        if q.scale_neg is not None:
            return None

        def fn() -> torch.Tensor:
            return ops.w8a16_linear(x, q.codes, q.scale, q.zero, q.outer, None, fmt, hidden)
    else:
        packed = pack_codes(q.codes, 4)

        def fn() -> torch.Tensor:
            return ops.w4a16_linear(x, packed, q.scale, q.scale_neg, q.zero, q.outer, None,
                                    fmt, hidden)
    if device.startswith("cuda"):
        from triton.testing import do_bench_cudagraph

        fn()  # autotune outside the capture
        return do_bench_cudagraph(fn, rep=100) * 1e-3
    fn()
    return _timed(fn, device, repeats)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int, host: list[float] | None = None) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls, each from an idle device to its end.
    ``host``: gets appended the best time until ``fn`` returned (before the sync): a call
    whose host time is close to its wall time is bound by the host, not by its kernels."""
    best = best_host = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        best_host = min(best_host, returned - start)
    if host is not None:
        host.append(best_host)
    return best


#: ``torch.cuda.memory_stats`` counters that tell whether a call went past the caching
#: allocator's cache: device allocations and frees (``cudaMalloc``/``cudaFree``, which
#: synchronize and cost hundreds of microseconds) and retries after freeing cached blocks.
_ALLOC_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


class GcPauses:
    """Python garbage collections while in the ``with`` block: count per generation and their
    total time (a collection that walks a compiled model's objects stalls the launches)."""

    def __enter__(self) -> GcPauses:
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.counts[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._start

    def report(self) -> dict[str, Any]:
        return {"collections_per_generation": list(self.counts),
                "seconds": round(self.seconds, 6)}


def _alloc_counts(device: str) -> dict[str, int]:
    if not device.startswith("cuda"):
        return {}
    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(name, 0)) for name in _ALLOC_COUNTERS}


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _split_name(name: str) -> tuple[str, bool, bool, bool]:
    """``(base variant, combo, pdl, attention pdl)`` of ``name`` = base [``-combo``]
    [``-pdl``] [``-apdl``]."""
    rest = name.removesuffix("-apdl")
    apdl = rest != name
    mid = rest.removesuffix("-pdl")
    base = mid.removesuffix("-combo")
    return base, base != mid, mid != rest, apdl


def variant_recipe(name: str) -> str | None:
    """The recipe of variant ``name`` (None: the bf16 baseline).

    Raises:
        KeyError: ``name`` is not a variant (``-pdl`` and ``-apdl`` only extend recipe
            variants).
    """
    base, _, pdl, apdl = _split_name(name)
    if base not in VARIANTS or ((pdl or apdl) and VARIANTS[base] is None):
        raise KeyError(name)
    return VARIANTS[base]


def run_variant(name: str, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """Build, compile, warm up and time one variant. Recipe variants run with
    ``runtime.GEMV_PDL`` and ``runtime.ATTN_PDL`` set from the name (``-pdl``, ``-apdl``),
    whatever ``QCOMPILE_GEMV_PDL`` and ``QCOMPILE_ATTN_PDL`` say, and record whether their
    GEMVs and decode attention launched as programmatic dependents (``pdl``,
    ``attention_pdl``); ``-combo`` compiles with Inductor's ``combo_kernels`` (recorded as
    ``combo_kernels``)."""
    import torch._inductor.config as inductor_config

    from qcompile.backends.triton import runtime

    base, combo, want, want_attn = _split_name(name)
    old = runtime.GEMV_PDL, runtime.ATTN_PDL
    runtime.GEMV_PDL, runtime.ATTN_PDL = want, want_attn
    try:
        with inductor_config.patch(combo_kernels=combo):
            out = _run_variant(base, args, dtype)
    finally:
        runtime.GEMV_PDL, runtime.ATTN_PDL = old
    if out["recipe"] is not None:
        out["pdl"] = want and _pdl_available(args.device)
        out["attention_pdl"] = want_attn and _pdl_available(args.device)
    out["combo_kernels"] = combo
    return out


def _pdl_available(device: str) -> bool:
    try:
        from qcompile.backends.triton import pdl
    except ImportError:  # no triton: no kernels at all
        return False
    return pdl.available(torch.device(device))


def _run_variant(name: str, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    import qcompile

    torch._dynamo.reset()
    # The previous variant's model sits in reference cycles (its compiled forward refers back
    # to it) that only the cyclic collector frees: without a collection here its unquantized
    # embedding and head stayed resident (+2.6 GB in the H200 run of 2026-11-27).
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args.model_shape, args.layers, args.device, dtype)
    vocab = model.config.vocab_size
    recipe = VARIANTS[name]
    pipeline = None
    head = None
    if recipe is not None:
        from qcompile.recipes import RECIPES

        pipeline = with_lm_head(RECIPES[recipe].pipeline) if args.lm_head else None
        head = head_format(pipeline or RECIPES[recipe].pipeline)
    start = time.perf_counter()
    # A static cache fixes every decode shape, so the graphs are compiled static too (with
    # dynamic=True, Inductor 2.11 failed to lower the cache's index_copy_ under CUDA graphs:
    # "indices must be int64, byte or bool. Got [torch.float64]").
    dynamic = args.cache != "static"
    if recipe is None:
        model.compile(dynamic=dynamic, mode=args.mode)
    else:
        qcompile.compile(model, recipe=None if pipeline else recipe, pipeline=pipeline,
                         dynamic=dynamic, free_weights=True, mode=args.mode,
                         fuse_linears=not name.endswith("-unfused"),
                         decode_fusion=not name.endswith("-nodf"),
                         decode_attention=not name.endswith("-noattn"))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen).to(args.device)
    long = torch.randint(0, vocab, (1, args.prefill), generator=gen).to(args.device)

    extra: dict[str, Any] = {}
    if args.cache == "static":  # fixed-shape KV cache: one decode graph, CUDA-graph friendly
        extra = {"cache_implementation": "static", "disable_compile": True}

    def generate(n: int) -> None:
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, **extra)

    if args.loop in ("direct", "graph"):
        loop = _direct_loop if args.loop == "direct" else _graph_loop
        with torch.no_grad():  # the graph loop runs (and compiles) its step here
            generate = loop(model, prompt, args.decode, args.device)

    def stage(what: str) -> None:
        print(f"decode.py: {name}: {what} at {time.perf_counter() - start:.1f} s", file=sys.stderr)

    with torch.no_grad():
        stage("built, compiling prefill and decode graphs")
        generate(args.decode)  # compiles prefill and decode graphs
        if args.loop != "generate":
            generate(args.decode)  # the prefill again, now over an initialized cache: a graph
        stage("compiling the long-prefill graph")
        model(long, use_cache=False)  # compiles the long-prefill graph
        warm = time.perf_counter() - start
        stage("warm, timing")
        if args.device.startswith("cuda"):
            # From here on: what serving needs (the full-precision weights are freed by now).
            torch.cuda.synchronize()
            resident = int(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        t_full = _timed(lambda: generate(args.decode), args.device, args.repeats)
        t_one = _timed(lambda: generate(1), args.device, args.repeats)
        host: list[float] = []
        before = _alloc_counts(args.device)
        with GcPauses() as pauses:
            t_prefill = _timed(lambda: model(long, use_cache=False), args.device,
                               args.repeats, host)
        allocs = {name: n - before[name] for name, n in _alloc_counts(args.device).items()}
        profiles: dict[str, Any] = {}
        if args.profile:
            from step_profile import profile_call, profile_tokens

            profiles["profile"] = profile_tokens(generate, args.decode, args.device)
            profiles["profile_prefill"] = profile_call(lambda: model(long, use_cache=False),
                                                       args.device)
        new_tokens = generate(args.decode)  # the direct and graph loops return them
    decode_s = max(t_full - t_one, 1e-9)
    out: dict[str, Any] = {
        "recipe": recipe,
        "pipeline": pipeline,
        "lm_head_quantized": head is not None,
        "head_format": head,
        "decode_tokens_per_s": round((args.decode - 1) / decode_s, 2),
        "prefill_tokens_per_s": round(args.prefill / t_prefill, 1),
        "prefill_seconds": round(t_prefill, 4),
        "prefill_host_seconds": round(host[0], 4),
        "prefill_gc": pauses.report(),  # over all the timed prefill calls
        "peak_memory_bytes": _peak_bytes(args.device),
        "warmup_seconds_including_compile": round(warm, 2),
    }
    if isinstance(new_tokens, torch.Tensor):
        out["greedy_tokens"] = new_tokens.flatten().tolist()
    if args.device.startswith("cuda"):
        out["resident_bytes_after_compile"] = resident
        out["peak_memory_bytes_while_timed"] = _peak_bytes(args.device)
        out["prefill_allocator_events"] = allocs  # over all the timed prefill calls
    if profiles:
        profiles["profile"]["measured_us_per_token"] = round(decode_s / (args.decode - 1) * 1e6,
                                                             2)
        profiles["profile_prefill"]["measured_us"] = round(t_prefill * 1e6, 1)
        out.update(profiles)
    if hasattr(generate, "cuda_graph"):
        out["cuda_graph"] = generate.cuda_graph
    backend = getattr(model, "qcompile_backend", None)
    if backend is not None:
        stats = backend.stats
        out["backend"] = {
            "pipeline_runs": stats.pipeline_runs, "weights_quantized": stats.weights_quantized,
            "fp_weight_bytes": stats.fp_weight_bytes, "quantized_bytes": stats.quantized_bytes,
            "freed_bytes": stats.freed_bytes, "graphs": stats.graphs,
            "graph_breaks": stats.graph_breaks, "linears_fused": stats.linears_fused,
            "compile_seconds": round(stats.compile_seconds, 2),
            # What lower-triton did in each graph (e.g. gemv_residual: adds fused into GEMVs).
            "lowered": [{k: v for k, v in p["facts"].items()
                         if isinstance(v, int) and not isinstance(v, bool)}
                        for r in stats.reports for p in r.get("passes", [])
                        if p.get("name") == "lower-triton"],
        }
        try:  # the kernel paths timed fastest (prefill shapes), as "op M N K ...": path
            from qcompile.backends.triton import path_tuning

            out["kernel_paths"] = {" ".join(map(str, key)): p
                                   for key, p in path_tuning.choices().items()}
            # Each candidate's cold/hot time in us, or why it was not timed.
            out["kernel_path_timings"] = {" ".join(map(str, key)): t
                                          for key, t in path_tuning.timings().items()}
            from qcompile.backends.triton import (
                fp8_plan,
                gemv_plan,
                rows_plan,
                w4a8_plan,
                w4a16_plan,
            )

            # Weights (row shapes for rows_plan, call shapes for gemv_plan) whose calls skip
            # the ops' full host path.
            out["host_plans"] = {"w4a16": w4a16_plan.plans(), "w4a8": w4a8_plan.plans(),
                                 "fp8": fp8_plan.plans(), "rows": rows_plan.plans(),
                                 "gemv": gemv_plan.plans()}
        except ImportError:  # no triton: the reference ops ran
            pass
        out["autotune_picks"] = autotune_picks()  # every variant's so far (keys hold shapes)
    model = None  # release before the next variant is built
    gc.collect()
    return out


def autotune_picks() -> dict[str, dict[str, str]]:
    """Each live Triton autotuner's choice per tuning key so far, as ``{kernel: {key:
    config}}`` (e.g. whether the batch-1 GEMVs ran staged tiles, and at which K split)."""
    import gc
    import warnings

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # no triton: nothing was tuned
        return {}
    tuners = []
    with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, Autotuner) and obj.cache:
                    tuners.append(obj)
            except ReferenceError:  # a weak proxy whose object is gone
                continue
    out: dict[str, dict[str, str]] = {}
    for tuner in tuners:
        picks = out.setdefault(getattr(tuner.base_fn, "__name__", str(tuner.base_fn)), {})
        for key, cfg in tuner.cache.items():
            picks[" ".join(map(str, key))] = ", ".join(
                [f"{k}={v}" for k, v in cfg.kwargs.items()]
                + [f"warps={cfg.num_warps}", f"stages={cfg.num_stages}"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens for decode")
    parser.add_argument("--decode", type=int, default=64, help="new tokens to time")
    parser.add_argument("--prefill", type=int, default=2048, help="prefill length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default=None, help="Inductor mode for every variant "
                        "(reduce-overhead: CUDA graphs, best with --cache static)")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="KV cache of generate(); static keeps the decode step's shapes "
                        "fixed (HF's own compile of it is disabled: the model is compiled)")
    parser.add_argument("--loop", choices=("generate", "direct", "graph"), default="generate",
                        help="time model.generate(), a plain greedy forward loop (direct), or "
                        "that loop's step captured as one CUDA graph by hand (graph; use "
                        "without --mode); both need --cache static")
    parser.add_argument("--lm-head", action="store_true",
                        help="quantize the output head too (recipe variants)")
    parser.add_argument("--gemv1", choices=("fma", "mma", "tma", "auto"), default="fma",
                        help="batch-1 FP4 GEMV kernel of the quantized variants: products on "
                        "FMAs (the default), on tensor cores (w4a16_gemv_mma), the persistent "
                        "TMA-fed FMA kernel (w4a16_gemv_tma), or per shape the fastest on a "
                        "cold L2 (auto; runtime.GEMV1_MMA)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--profile", action="store_true",
                        help="also list each kernel's (CUDA) or op's (CPU) time per decode "
                        "token and in one long prefill (benchmarks/step_profile.py), after the "
                        "timing")
    parser.add_argument("--stop-on-error", action="store_true",
                        help="stop at the first variant that fails (it is recorded)")
    args = parser.parse_args(argv)
    if args.decode < 2:
        parser.error("--decode must be >= 2")
    if args.loop != "generate" and args.cache != "static":
        parser.error(f"--loop {args.loop} needs --cache static")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = []
    for v in names:
        try:
            variant_recipe(v)
        except KeyError:
            unknown.append(v)
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} (any may "
                     "end in -combo, a recipe variant then in -pdl and -apdl)")
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.gemv1 != "fma":
        from qcompile.backends.triton import runtime

        runtime.GEMV1_MMA = {"mma": True, "tma": "tma", "auto": "auto"}[args.gemv1]
    result: dict[str, Any] = {
        "benchmark": "decode",
        "command": " ".join(["python", "benchmarks/decode.py", *(argv or sys.argv[1:])]),
        "model_shape": args.model_shape,
        "layers": args.layers or SHAPES[args.model_shape]["num_hidden_layers"],
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or "cpu"),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "batch": 1, "prompt": args.prompt, "decode_tokens": args.decode,
        "kv_cache": args.cache, "mode": args.mode, "loop": args.loop,
        "lm_head_quantized_in_recipes": args.lm_head, "gemv1": args.gemv1,
        "prefill_tokens": args.prefill,
        "variants": {},
    }
    full = SHAPES[args.model_shape]["num_hidden_layers"]
    if result["layers"] < full:
        result["full_depth_layers"] = full
        result["lm_head_seconds"] = head_seconds(args.model_shape, args.device, dtype)
        result["outside_layers_seconds"] = head_seconds(args.model_shape, args.device, dtype,
                                                        whole=True)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    failed = False
    for name in names:
        try:
            result["variants"][name] = run_variant(name, args, dtype)
            _quantized_head_outside(result, result["variants"][name], args, dtype)
        except Exception as exc:  # recorded; the other variants still run
            failed = True
            tail = traceback.format_exc().splitlines()[-12:]
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "traceback_tail": tail}
            gc.collect()
            if args.stop_on_error:
                print(f"decode.py: {name}: {result['variants'][name]['error'][:600]}",
                      file=sys.stderr)
                break
        print(f"decode.py: {name}: {json.dumps(result['variants'][name])[:600]}",
              file=sys.stderr)
        _ratios(result)
        _agreement(result)
        _write(result, args.out)  # after every variant: a run cut short keeps what it has
    text = json.dumps(result, indent=1)
    print(text)
    if failed:
        sys.exit(1)
    return result


def full_depth_tokens_per_s(tokens_per_s: float, layers: int, full: int,
                            head_s: float) -> float:
    """Decode tokens/s extrapolated from ``layers`` to ``full`` layers: the per-token time less
    the head's, scaled by ``full / layers``, plus the head's."""
    per_token = 1.0 / tokens_per_s
    return 1.0 / (max(per_token - head_s, 0.0) * full / layers + head_s)


def _quantized_head_outside(result: dict[str, Any], v: dict[str, Any],
                            args: argparse.Namespace, dtype: torch.dtype) -> None:
    """A variant with a quantized head gets its own ``outside_layers_seconds`` for the
    extrapolation: the bf16 outside work less the bf16 head plus its head's op
    (:func:`quantized_head_seconds`), all timed in this run."""
    fmt = v.get("head_format")
    if fmt is None or "outside_layers_seconds" not in result:
        return
    t = quantized_head_seconds(fmt, args.model_shape, args.device, dtype)
    if t is not None:
        v["head_seconds"] = t
        v["outside_layers_seconds"] = (result["outside_layers_seconds"]
                                       - result["lm_head_seconds"] + t)


def _ratios(result: dict[str, Any]) -> None:
    head_s = result.get("outside_layers_seconds", result.get("lm_head_seconds"))
    for v in result["variants"].values():
        out_s = v.get("outside_layers_seconds",
                      None if v.get("lm_head_quantized") else head_s)
        if "error" not in v and out_s is not None and "full_depth_layers" in result:
            v["decode_tokens_per_s_at_full_depth"] = round(full_depth_tokens_per_s(
                v["decode_tokens_per_s"], result["layers"], result["full_depth_layers"],
                out_s), 2)
            v["full_depth_is_extrapolated"] = True
    base = result["variants"].get("bf16")
    if base is None or "error" in base:
        return
    for v in result["variants"].values():
        if "error" not in v:
            v["decode_speedup_vs_bf16"] = round(
                v["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
            v["prefill_ratio_vs_bf16"] = round(
                v["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 3)
            if "decode_tokens_per_s_at_full_depth" in v:
                v["decode_speedup_vs_bf16_at_full_depth"] = round(
                    v["decode_tokens_per_s_at_full_depth"]
                    / base["decode_tokens_per_s_at_full_depth"], 3)


def _agreement(result: dict[str, Any]) -> None:
    """For each variant, how many of its greedy tokens equal, from the first, those of the
    first variant with the same recipe and head (``w4a16-fp4-pdl`` against ``w4a16-fp4``, say):
    the kernels a variant switches on should not change the model's output. Random weights
    give flat logits, so a near tie flipped by summation order ends the run of equal tokens
    early without any error; a broken kernel ends it at once."""
    firsts: dict[tuple, str] = {}
    for name, v in result["variants"].items():
        if "greedy_tokens" not in v or v.get("recipe") is None:
            continue
        key = (v["recipe"], v.get("pipeline"), v.get("lm_head_quantized"))
        first = firsts.setdefault(key, name)
        if first != name:
            a, b = result["variants"][first]["greedy_tokens"], v["greedy_tokens"]
            n = min(len(a), len(b))
            same = next((i for i in range(n) if a[i] != b[i]), n)
            v["greedy_tokens_agree_with"] = {"variant": first, "leading_equal": same, "of": n}


def _write(result: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
