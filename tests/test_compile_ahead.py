"""``runtime.compile_ahead``: an autotuner's candidates are compiled on a thread pool before
it times the first of them.

Like ``tests/test_triton_launch.py`` this needs real ``JITFunction`` kernels, so the check runs
in a subprocess without ``TRITON_INTERPRET``, with the stand-in CUDA driver of
``tests/fake_cuda.py`` (real sm_90 compiles, launches recorded instead of run). The autotuner
there times each config with a function that counts the kernels already in the JIT cache.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _worker(out: str) -> None:
    sys.path.insert(0, str(HERE))
    import fake_cuda
    import test_triton_compile_sm90 as c90
    import triton

    from qcompile.backends.triton import runtime, w4a8_dequant

    fake_cuda.install()
    _, family, params = next(c for c in c90.CASES if c[0] == "w4a8-shift-g128")
    fn, args, consts, _ = c90._BUILDERS[family](w4a8_dequant, params, False)
    named = fake_cuda.placeholders(args)
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
               for bn, bk, w in ((32, 256, 4), (64, 256, 4), (16, 512, 4), (32, 512, 8))]
    cached_at_first_timing = []

    def bench(kernel_call, quantiles):
        if not cached_at_first_timing:
            cached_at_first_timing.append(sum(len(c[0]) for c in fn.device_caches.values()))
        kernel_call()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    report = {}
    for threads in ("1", "4"):
        os.environ["QCOMPILE_COMPILE_THREADS"] = threads
        fn.device_caches.clear()
        cached_at_first_timing.clear()
        tuned = triton.autotune(configs, key=["N"], prune_configs_by=runtime.tuning(None, fn),
                                do_bench=bench)(fn)
        tuned[lambda meta: (1,)](*[named[n] for n in fn.arg_names if n in named],
                                 GROUP_SIZE=consts["GROUP_SIZE"])
        report[threads] = {"cached_at_first_timing": cached_at_first_timing[0],
                           "cached_after": sum(len(c[0]) for c in fn.device_caches.values()),
                           "launches": len(fake_cuda.LAUNCHES)}
    Path(out).write_text(json.dumps(report))


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("triton")
    import fake_cuda

    return fake_cuda.run_worker(__file__, "compile-ahead")


def test_candidates_compiled_before_the_first_timing(report):
    """With 4 threads every candidate is in the JIT cache when the first one is timed; with
    one thread (compile-ahead off) none is, each compiles when its timing launches it. Either
    way all four end up compiled, and each run launches four timings and the chosen config."""
    assert report["4"]["cached_at_first_timing"] == 4
    assert report["1"]["cached_at_first_timing"] == 0
    assert report["4"]["cached_after"] == report["1"]["cached_after"] == 4
    assert report["1"]["launches"] == 5 and report["4"]["launches"] == 10


def test_compile_threads_env(monkeypatch):
    from qcompile.backends.triton import runtime

    monkeypatch.setenv("QCOMPILE_COMPILE_THREADS", "3")
    assert runtime.compile_threads() == 3
    monkeypatch.setenv("QCOMPILE_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="QCOMPILE_COMPILE_THREADS"):
        runtime.compile_threads()
    monkeypatch.delenv("QCOMPILE_COMPILE_THREADS")
    assert 1 <= runtime.compile_threads() <= 16


if __name__ == "__main__":
    _worker(sys.argv[1])
