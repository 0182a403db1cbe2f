"""``attention_plan``: a decode step's ``qcompile::decode_attention`` (and ``_write``) call
relaunches its prepared kernel with the full path's arguments as the cache grows, and never a
stale launch.

As in ``tests/test_gemv_plan.py`` the checks run in a subprocess (this file as a script) with
the stand-in CUDA driver of ``tests/fake_cuda.py``: the kernels compile for sm_90 and the
launcher records its arguments. Each case compares the planned call's launch with the full
path's (plans off) on the same tensors: the same compiled kernel, grid and scalars (the cache
length and its strides included), the same input memory, fresh partial-sum buffers of the
same size, and the result it returns written by the kernel. The kernel's numerics are checked
by ``tests/test_decode_attention.py``; a relaunch passes it the same arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import attention_plan  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = ["growing-cache-rope", "bool-mask", "additive-mask-fp32", "static-write",
         "lengths-disagree", "release", "compiled-decode"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check (CPU)")
def test_interpreter_keeps_the_full_path():
    """Interpreted kernels cannot be prepared: no plan, given up after ``TRIES``, and every
    call gives the reference's result."""
    from qcompile.backends.triton.ops import decode_attention_ref, kernels_on_cpu

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, r, 16, generator=gen) for h, r in ((4, 1), (2, 40), (2, 40)))
    attention_plan.clear()
    try:
        with kernels_on_cpu():
            got = [torch.ops.qcompile.decode_attention(q, k, v)
                   for _ in range(attention_plan.TRIES + 3)]
        assert attention_plan.plans() == 0
        assert list(attention_plan._PLANS.values()) == [attention_plan.TRIES + 1]
    finally:
        attention_plan.clear()
    ref = decode_attention_ref(q, k, v, gqa=True)
    for g in got:
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def report() -> dict:
    import fake_cuda

    return fake_cuda.run_worker(__file__, "attention plan")


@pytest.mark.parametrize("case", CASES)
def test_planned_launch_is_the_full_paths(report, case):
    """The planned call launches what the full path launches (module docstring) as a dynamic
    cache grows (lengths in and out of a multiple of 16), with masks, in fp32, for a static
    cache's in-place write; lengths that disagree take the full path; no call's tensor is
    held; a compiled model's decode steps take the plan."""
    assert report[case]["ok"], report[case].get("error")


# --- the fake-CUDA worker (run as a script) ------------------------------------------------

def _worker(out: str) -> None:  # noqa: C901 - one closure per case
    """Run the cases; write ``{case: {"ok", "error"}}`` to ``out``."""
    import gc
    import weakref
    from unittest.mock import patch

    sys.path.insert(0, str(HERE))
    import fake_cuda

    from qcompile.backends.triton.runtime import arrival_counts

    fake_cuda.wrappers_as_on_gpu()
    attend = torch.ops.qcompile.decode_attention
    attend_write = torch.ops.qcompile.decode_attention_write
    gen = torch.Generator().manual_seed(0)
    counts = arrival_counts(torch.device("cpu"), 1)

    launched = fake_cuda.one_launch

    def full(fn) -> tuple:
        with patch.object(attention_plan, "run", lambda *a: a[-1]()):  # the op's full path
            return launched(fn)

    def compare(ref: tuple, got: tuple, inputs: tuple) -> None:
        """``got``'s launch is ``ref``'s with its result and partial sums moved."""
        (ref_y, ref_launch), (y, launch) = ref, got
        assert y.shape == ref_y.shape and y.dtype == ref_y.dtype
        kept = {t.data_ptr() for t in (*inputs, counts) if t is not None}

        def tensor(i, f, p):
            if f.data_ptr() == ref_y.data_ptr():
                assert p.data_ptr() == y.data_ptr(), f"argument {i}: not the result"
            elif f.data_ptr() in kept:
                assert p.data_ptr() == f.data_ptr(), f"argument {i}: another tensor"
            else:  # the partial sums: this call's own buffer
                assert p.numel() == f.numel() and p.data_ptr() not in kept, i

        fake_cuda.same_launch(ref_launch, launch, tensor)

    def grow(k: torch.Tensor, by: int) -> torch.Tensor:  # a dynamic cache's next tensor
        return torch.cat([k, torch.randn(*k.shape[:2], by, k.shape[3], generator=gen,
                                         dtype=torch.float32).to(k.dtype)], dim=2)

    def steps(make, lengths, start: int = 300) -> None:
        """``make(k, v)`` -> (call, inputs) at each cache length; from the third call on
        (the first tunes, the second records) each is checked against the full path."""
        k = torch.randn(1, 2, start, 64, generator=gen).bfloat16()
        v = torch.randn(1, 2, start, 64, generator=gen).bfloat16()
        for i, n in enumerate(lengths):
            k, v = grow(k, n - k.shape[2]), grow(v, n - v.shape[2])
            call, inputs = make(k, v)
            if i < 2:
                call()
                continue
            ref = full(call)
            compare(ref, launched(call), inputs)

    def growing_cache_rope() -> None:
        q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()
        ang = torch.arange(64).view(1, 1, 1, 64) * 0.01
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()

        def make(k, v):
            return (lambda: attend(q, k, v, None, None, False, cos, sin)), (q, k, v, cos, sin)

        steps(make, [300, 301, 302, 304, 305, 320, 511])
        assert attention_plan.plans() == 1, "one key for lengths of one bucket"
        steps(make, [513, 600, 700], start=513)  # the next bucket: its own key
        assert attention_plan.plans() == 2

    def bool_mask() -> None:
        q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()

        def make(k, v):
            mask = torch.rand(1, 1, 1, k.shape[2], generator=gen) < 0.9
            return (lambda: attend(q, k, v, mask)), (q, k, v, mask)

        steps(make, [300, 310, 320, 333])

    def additive_mask_fp32() -> None:
        q = torch.randn(1, 8, 1, 64, generator=gen)
        state = {}

        def make(k, v):
            k, v = k.float(), v.float()
            mask = torch.randn(1, 8, 1, k.shape[2], generator=gen)
            state["kv"] = (k, v)
            return (lambda: attend(q, k, v, mask, 0.2)), (q, k, v, mask)

        steps(make, [300, 301, 302, 303])

    def static_write() -> None:
        kc = torch.zeros(1, 2, 512, 64).bfloat16()
        vc = torch.zeros(1, 2, 512, 64).bfloat16()
        mask = (torch.arange(512) <= 300).view(1, 1, 1, 512)
        ang = torch.arange(64).view(1, 1, 1, 64) * 0.01
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        for pos in range(300, 306):
            qkv = torch.randn(1, 1, 12, 64, generator=gen).bfloat16().transpose(1, 2)
            q, k_new, v_new = qkv[:, :8], qkv[:, 8:10], qkv[:, 10:]
            index = torch.tensor([pos])
            call = lambda: attend_write(q, kc, vc, index, k_new, v_new, mask, None,  # noqa
                                        False, cos, sin, cos, sin)
            if pos < 302:
                call()
                continue
            ref = full(call)
            compare(ref, launched(call), (q, kc, vc, index, k_new, v_new, mask, cos, sin))
        assert attention_plan.plans() == 1

    def lengths_disagree() -> None:
        q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()
        k = torch.randn(1, 2, 300, 64, generator=gen).bfloat16()
        for _ in range(3):
            attend(q, k, k)
        assert attention_plan.plans() == 1
        try:
            attend(q, k, k[:, :, :299])
            raise AssertionError("a shorter v was taken")
        except RuntimeError as exc:  # the full path's reference names the sizes
            assert "299" in str(exc) or "size" in str(exc), exc

    def release() -> None:
        q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()
        k = torch.randn(1, 2, 300, 64, generator=gen).bfloat16()
        mask = torch.ones(1, 1, 1, 300, dtype=torch.bool)
        for _ in range(3):
            y = attend(q, k, k, mask)
        (plan,) = attention_plan._PLANS.values()
        held = [v for v in (*plan.ready.values, *plan.ready.args,
                            *plan.ready.kwargs.values()) if isinstance(v, torch.Tensor)]
        assert {t.data_ptr() for t in held} <= {counts.data_ptr()}, "a call's tensor is held"
        refs = [weakref.ref(t) for t in (q, k, mask, y)]
        del q, k, mask, y, plan, held
        fake_cuda.LAUNCHES.clear()  # the recorded launches hold their arguments
        gc.collect()
        assert all(r() is None for r in refs), "a plan keeps a tensor alive"

    def compiled_decode() -> None:
        """A compiled tiny Llama decoding with a dynamic cache: each layer's attention is
        answered by the plan once its key has been seen twice."""
        from transformers import DynamicCache

        import qcompile
        from qcompile.testing import tiny_model

        torch.manual_seed(0)
        model = tiny_model("llama")
        qcompile.compile(model, recipe="w4-fp4", lower="always")
        fake_cuda.RECORD = False
        answered = [0]
        real_relaunch = attention_plan._relaunch

        def relaunch(*args):
            answered[0] += 1
            return real_relaunch(*args)

        attention_plan._relaunch = relaunch
        try:
            ids = torch.randint(3, 256, (1, 70))  # a cache of 70..75: one length bucket
            cache = DynamicCache()
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True)
                seen = []
                for _ in range(5):
                    answered[0] = 0
                    model(ids[:, -1:], past_key_values=cache, use_cache=True)
                    seen.append(answered[0])
        finally:
            attention_plan._relaunch = real_relaunch
            fake_cuda.RECORD = True
        layers = model.config.num_hidden_layers
        assert seen[-2:] == [layers, layers] and seen[0] == 0, seen

    fake_cuda.run_cases(dict(zip(CASES, (growing_cache_rope, bool_mask, additive_mask_fp32,
                                         static_write, lengths_disagree, release,
                                         compiled_decode), strict=True)),
                        out, attention_plan.clear)


if __name__ == "__main__":
    _worker(sys.argv[1])
