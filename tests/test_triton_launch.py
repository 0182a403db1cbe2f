"""``launch.launch`` passes a kernel's launcher exactly what ``kernel[grid](...)`` passes.

The checks need real ``JITFunction`` kernels and Triton's real launch path, so they run in a
subprocess (this file as a script) without ``TRITON_INTERPRET``, with the stand-in driver of
``tests/fake_cuda.py``: kernels compile for sm_90 and only the final launch is recorded. For
several of qcompile's kernels, with realistic arguments:

* the fast path's launch (from its second call) equals Triton's: grid, stream, function,
  metadata and every argument;
* a call that Triton would specialize differently (an integer that is no longer a multiple of
  16, a pointer no longer 16-byte aligned) gets the kernel Triton compiles for it, not the
  cached one;
* through an autotuner, each tuning key gets the config the autotuner chose for it, and the
  autotuner's ``best_config`` reflects the launch (wrappers read it);
* a programmatic dependent launch (``launch_pdl``, the batch-1 GEMVs' ``pdl``) keeps its
  launch option on the fast path;
* a TMA descriptor argument (``w4a16_gemv_tma``) reaches the launcher as Triton passes it;
* a prepared launch (``launch.prepare``) with a tensor replaced passes what the fast path
  passes for that call, also through an autotuner; with a tensor Triton would specialize
  differently it launches that specialization's kernel; one told to let go of a tensor
  (``vary``) holds no reference to it and refuses a call without it.

Under the interpreter ``launch`` is ``kernel[grid](...)`` (interpreted kernels are no
``JITFunction``), which the kernel tests exercise on every CPU run.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
#: (compile-test case, its integer argument to perturb) for the kernels checked.
CASES = [("w4a16-dequant-fp4w-bf16-g128-afpq", "N"), ("w4a8-shift-g128", "K"),
         ("w4a16-gemv1w-bf16-g128-afpq", "N"), ("fp8-persistent-bm128-bias", "M"),
         ("w4a16-gemv1w-bf16-g128-fp4-rms-res", "N"),
         ("w4a16-gemv1mma-bf16-g128-fp4-gate-res-pdl", "N"),
         ("decode-attn-bf16-g4-d128-bool-write", "L"),
         ("w4a16-gemv1tma-bf16-g128-fp4-rms-res-pdl", "N")]


def _same(a: tuple, b: tuple) -> str | None:
    """None when the fast path's launcher call ``b`` matches Triton's ``a`` (tensors by
    identity), else what differs. Launcher arguments 6-8 are the launch metadata and the
    enter/exit hooks: Triton passes its (empty) hook chains and their metadata, the fast
    path None for all three (nothing to call)."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} launcher arguments"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i in (6, 7, 8):
            if y is not None or (i > 6 and getattr(x, "calls", None)):
                return f"argument {i}: {x!r} / {y!r} (hooks installed?)"
        elif hasattr(x, "data_ptr") or hasattr(y, "data_ptr") or i == 4:
            if x is not y:
                return f"argument {i}: {x!r} is not {y!r}"
        elif x != y:
            return f"argument {i}: {x!r} != {y!r}"
    return None


def _worker(out: str) -> None:
    """Run the checks; write ``{case: {"ok": bool, "error": str}}`` to ``out``."""
    sys.path.insert(0, str(HERE))
    import fake_cuda
    import test_triton_compile_sm90 as c90
    import torch
    import triton

    from qcompile.backends.triton import launch as fast

    fake_cuda.install()
    cases = {c[0]: c for c in c90.CASES}
    report: dict[str, dict] = {}

    def call(kernel, grid, named: dict, kw: dict, fast_path: bool):
        names = list(kernel.arg_names)
        pos = [named[n] for n in names if n in named]
        before = len(fake_cuda.LAUNCHES)
        ret = (fast.launch(kernel, grid, *pos, **kw) if fast_path
               else kernel[grid](*pos, **kw))
        assert len(fake_cuda.LAUNCHES) == before + 1, "no launch recorded"
        return ret, fake_cuda.LAUNCHES[-1][1]

    for case_id, int_arg in CASES:
        try:
            _, family, params = cases[case_id]
            mod = importlib.import_module(f"qcompile.backends.triton.{c90._MODULES[family]}")
            fn, args, consts, configs = c90._BUILDERS[family](mod, params, False)
            cfg = configs[0]
            kw = dict(consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if params.get("pdl"):  # Triton's launch option goes with the kernel's flag
                kw["launch_pdl"] = True
            named = fake_cuda.placeholders(args, kw)
            grid = (3, 2)
            meta_grid = lambda meta, g=grid: g  # noqa: E731
            fast.clear()
            k0, l0 = call(fn, grid, named, kw, False)
            call(fn, grid, named, kw, True)  # first call: Triton's path, fills the cache
            k1, l1 = call(fn, grid, named, kw, True)
            assert k1 is k0, "fast path launched another compiled kernel"
            assert k1.metadata.launch_pdl == bool(params.get("pdl")), "launch_pdl not kept"
            assert (err := _same(l0, l1)) is None, err
            # A specialization change: the integer argument off the multiples of 16 ...
            odd = dict(named, **{int_arg: named[int_arg] + 1})
            k2, l2 = call(fn, grid, odd, kw, False)
            k3, l3 = call(fn, grid, odd, kw, True)
            k3, l3 = call(fn, grid, odd, kw, True)
            assert k2 is not k0 and k3 is k2, "integer specialization not followed"
            assert (err := _same(l2, l3)) is None, err
            # ... and the first pointer no longer 16-byte aligned.
            first = next(k for k, v in named.items() if isinstance(v, torch.Tensor))
            shifted = dict(named, **{first: named[first][1:]})
            k4, l4 = call(fn, grid, shifted, kw, False)
            call(fn, grid, shifted, kw, True)
            k5, l5 = call(fn, grid, shifted, kw, True)
            assert k4 is not k0 and k5 is k4, "alignment specialization not followed"
            assert (err := _same(l4, l5)) is None, err
            # A prepared launch: the fast path's launch, with a tensor replaced ...
            ready = fast.prepare(fn, grid, *[named[n] for n in fn.arg_names if n in named],
                                 **kw)
            assert ready is not None, "not prepared after a fast launch"
            held = named[first]
            assert ready.vary(first) is ready
            assert all(v is not held for v in (*ready.values, *ready.args,
                                               *ready.kwargs.values())), "still holds it"
            try:
                ready()
                raise AssertionError("a call without the varying tensor launched")
            except TypeError as exc:
                assert first in str(exc), exc
            other = named[first].clone()
            before = len(fake_cuda.LAUNCHES)
            assert ready(**{first: other}) is k0
            lp = fake_cuda.LAUNCHES[-1][1]
            assert len(fake_cuda.LAUNCHES) == before + 1
            _, lf = call(fn, grid, dict(named, **{first: other}), kw, True)
            assert (err := _same(lf, lp)) is None, err
            # ... and one Triton would specialize differently: launch's kernel for it.
            off = other[1:]
            assert ready(**{first: off}) is k4, "prepared launch kept its alignment"
            lp = fake_cuda.LAUNCHES[-1][1]
            _, lf = call(fn, grid, dict(named, **{first: off}), kw, True)
            assert (err := _same(lf, lp)) is None, err
            # An integer passed at each call: the same kernel within its class (here +16),
            # the binder's kernel for another (+1: off the multiples of 16).
            ready = fast.prepare(fn, grid, *[named[n] for n in fn.arg_names if n in named],
                                 **kw).vary(int_arg)
            for step, want in ((16, k0), (1, k2)):
                at = dict(named, **{int_arg: named[int_arg] + step})
                assert ready(**{int_arg: at[int_arg]}) is want, f"{int_arg} + {step}"
                lp = fake_cuda.LAUNCHES[-1][1]
                _, lf = call(fn, grid, at, kw, True)
                assert (err := _same(lf, lp)) is None, err
            # An autotuner whose choice depends on the key: 4 warps for even values, 8 odd.
            warps = [triton.Config(cfg.kwargs, num_warps=w, num_stages=cfg.num_stages)
                     for w in (4, 8)]

            def prune(configs, nargs, arg=int_arg, **kwargs):
                return [configs[nargs[arg] % 2]]

            tuned = triton.autotune(warps, key=[int_arg],
                                    prune_configs_by={"early_config_prune": prune})(fn)
            values = (named[int_arg], named[int_arg] + 1)
            triton_calls = {}
            for value in values:  # Triton's launch, then the fast path's first (tuning) call
                at = dict(named, **{int_arg: value})
                triton_calls[value] = call(tuned, meta_grid, at, consts, False)
                call(tuned, meta_grid, at, consts, True)
            for value in values * 2:  # alternating keys: each gets its own config
                at = dict(named, **{int_arg: value})
                kf, lf = call(tuned, meta_grid, at, consts, True)
                assert tuned.best_config is warps[value % 2], "best_config not the key's"
                kt, lt = triton_calls[value]
                assert kf is kt and kf.metadata.num_warps == 4 * (1 + value % 2)
                assert (err := _same(lt, lf)) is None, err
                at = dict(named, **{int_arg: value})
                ready = fast.prepare(tuned, meta_grid,
                                     *[at[n] for n in fn.arg_names if n in at], **consts)
                tuned.best_config = None
                assert ready() is kt and tuned.best_config is warps[value % 2]
                assert ready.vary(first)(**{first: at[first]}) is kt
                assert (err := _same(lt, fake_cuda.LAUNCHES[-1][1])) is None, err
            if "PRO" in consts:  # a constexpr in the tuning key (the GEMVs key on PRO)
                by_pro = triton.autotune(
                    warps, key=["N", "PRO"],
                    prune_configs_by={"early_config_prune":
                                      lambda configs, nargs, **kw: [configs[kw["PRO"] % 2]]})(fn)
                for pro in (1, 0, 1, 0):
                    kp, _ = call(by_pro, meta_grid, named, dict(consts, PRO=pro), True)
                    assert by_pro.best_config is warps[pro % 2], "best_config not PRO's"
                    assert kp.metadata.num_warps == 4 * (1 + pro % 2)
            report[case_id] = {"ok": True}
        except Exception as exc:
            report[case_id] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    Path(out).write_text(json.dumps(report))


def test_int_class_is_tritons_integer_specialization():
    """Two integers share :func:`launch.int_class` exactly where Triton specializes them
    alike (a prepared launch passes a new size or stride only within its class)."""
    pytest.importorskip("triton")
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    from qcompile.backends.triton.launch import int_class

    values = [0, 1, 2, 15, 16, 17, 32, 48, 4096, 4097, -1, -16, -17, 2**31 - 16, 2**31 - 1,
              2**31, 2**31 + 16, -2**31, -2**31 - 16, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 16]
    ours = {v: int_class(v) for v in values}
    theirs = {v: native_specialize_impl(CUDABackend, v, False, True, True) for v in values}
    for a in values:
        for b in values:
            assert (ours[a] == ours[b]) == (theirs[a] == theirs[b]), (a, b, theirs[a],
                                                                      theirs[b])


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("triton")
    import fake_cuda

    return fake_cuda.run_worker(__file__, "launch")


@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_fast_launch_matches_triton(report, case):
    assert report[case] == {"ok": True}, report[case].get("error")


def test_launch_falls_back_for_other_kernels():
    """A kernel that is no ``JITFunction`` (an interpreted one, a test's spy) or an autotuner
    around one goes through its own ``__getitem__``, with the grid and the arguments
    unchanged."""
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    from qcompile.backends.triton import launch as fast

    seen = []

    class Kernel:
        arg_names = ["n", "s"]

        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((grid, a, k)) or "ran"

    class Tuner(Autotuner):
        def __init__(self, fn):  # no configs: only its type and its kernel matter here
            self.fn = fn

        def __getitem__(self, grid):
            return self.fn[grid]

    assert fast.launch(Kernel(), (2, 1), 1, "x", BLOCK=4) == "ran"
    assert fast.launch(Tuner(Kernel()), (3,), 5, "y", BLOCK=8) == "ran"
    assert seen == [((2, 1), (1, "x"), {"BLOCK": 4}), ((3,), (5, "y"), {"BLOCK": 8})]


if __name__ == "__main__":
    shutil.rmtree(os.environ.get("TRITON_CACHE_DIR", "/nonexistent"), ignore_errors=True)
    _worker(sys.argv[1])
