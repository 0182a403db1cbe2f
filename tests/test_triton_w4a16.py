"""W4A16 Triton kernels (:mod:`qcompile.backends.triton.w4a16`) against their PyTorch reference.

On CPU the kernels run under the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``) on a
representative subset of shapes; on CUDA the full grid runs. Weights are real qcompile
quantizations of random matrices, packed with ``pack_codes``.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from qcompile.backends.triton import w4a16 as w4  # noqa: E402
from qcompile.backends.triton.runtime import KernelInputError  # noqa: E402
from qcompile.formats import pack_codes, parse_format, quantize  # noqa: E402
from qcompile.ops import dequantize_weight  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

FORMATS = [
    "fp4_e2m1/g128", "fp4_e2m1/g128/asym", "int4/g128", "int4/g64/asym", "nf4/g64",
    "nf4/g64/asym", "fp4_e2m1/g32/m2", "fp4_e2m1/g128/po2", "fp4_e2m1/channel", "nvfp4",
]

# (M, N, K, dtype). CPU (interpreter): a subset per format that still covers the GEMV (split and
# single-split), the GEMM, fp32/bf16/fp16, ragged and odd K. CUDA: the full grid.
_CPU_CASES = [
    (1, 96, 1000, torch.float32), (7, 200, 130, torch.bfloat16), (33, 200, 576, torch.bfloat16),
    (33, 96, 1000, torch.float32), (3, 96, 131, torch.float16),
]
_GPU_CASES = [
    (m, n, k, dt) for m, n, k, dt in itertools.product(
        (1, 7, 33, 4097), (96, 200), (576, 1000, 130, 131), (torch.float32, torch.bfloat16))
]
CASES = _GPU_CASES if CUDA else _CPU_CASES


@functools.cache
def _weights(fmt: str, n: int, k: int):
    """(packed, table, scale, scale_neg, zero, outer, group_size) for a random [n, k] weight."""
    spec = parse_format(fmt)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt}/{n}/{k}".encode()))
    q = quantize(torch.randn(n, k, generator=gen), spec)
    info = spec.element
    # Code -> value: INT sym codes are offset binary (the element table, code + min); INT asym
    # codes are the unsigned level itself; FP/NF codes index the element table.
    table = (torch.arange(16, dtype=torch.float32) if info.kind == "int" and q.zero is not None
             else info.table())
    gs = spec.group_size if spec.granularity == "group" else k
    mv = [None if t is None else t.to(DEV) for t in (q.scale_neg, q.zero, q.outer)]
    return (pack_codes(q.codes, 4).to(DEV), table.to(DEV), q.scale.to(DEV), *mv, gs)


def _inputs(fmt, m, n, k, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    b = torch.randn(n, generator=gen).to(dtype).to(DEV) if bias else None
    return x, _weights(fmt, n, k), b


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel vs reference. Both round the same fp32 sums once; only the summation order
    differs, so fp32 agrees to ~1e-5 of the output's scale and 16-bit outputs to one ulp
    (rtol = 2^-7 is one to two bf16 ulps; a small atol covers cancelled, tiny outputs)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.float(), ref.float()
    amax = max(r.abs().max().item(), 1e-30) if r.numel() else 1.0
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[ref.dtype]
    torch.testing.assert_close(o, r, rtol=rtol, atol=amax * rtol / 4)


def assert_matches_unrounded(out, ref, x, w) -> None:
    """:func:`assert_matches` for the batch-1 GEMV, which multiplies the unrounded fp32 weight
    where the reference rounds it to x's dtype first (relative 2^-9 for bf16, 2^-12 for fp16
    per weight): 16-bit outputs may also differ by that rounding summed over K."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    wf = w4._dequant_ref(*w[:6], w[6], x.shape[-1])
    unit = {torch.float32: 0.0, torch.bfloat16: 2**-9, torch.float16: 2**-12}[ref.dtype]
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[ref.dtype]
    r = ref.float()
    allowed = (x.float().abs() @ wf.abs().t()) * unit + rtol * r.abs() + r.abs().max() * rtol / 4
    err = (out.float() - r).abs()
    assert (err <= allowed).all(), f"worst excess {(err - allowed).max().item():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_is_dequantize_then_linear(fmt):
    """The reference decodes exactly like ``dequantize_weight`` and is an fp32 linear."""
    for m, n, k, dtype in [(3, 96, 1000, torch.float32), (5, 200, 131, torch.bfloat16)]:
        x, (packed, table, scale, neg, zero, outer, gs), b = _inputs(fmt, m, n, k, dtype)
        w = dequantize_weight(packed, scale, neg, zero, outer, fmt, k, torch.float32)
        assert torch.equal(w4._dequant_ref(packed, table, scale, neg, zero, outer, gs, k), w)
        ref = w4.w4a16_linear_ref(x, packed, table, scale, neg, zero, outer, gs, b)
        wx = dequantize_weight(packed, scale, neg, zero, outer, fmt, k, dtype)
        exact = F.linear(x.float(), wx.float(), b.float()).to(dtype)
        assert torch.equal(ref, exact)
        if dtype == torch.float32:
            assert torch.equal(ref, F.linear(x, wx, b))
        else:  # torch's own bf16 GEMM sums in another order: one ulp apart at most
            assert_matches(F.linear(x, wx, b), ref)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k,dtype", CASES,
                         ids=[f"m{m}-n{n}-k{k}-{str(d)[6:]}" for m, n, k, d in CASES])
def test_kernel_matches_reference(fmt, m, n, k, dtype):
    x, w, b = _inputs(fmt, m, n, k, dtype, bias=(m + k) % 2 == 0)
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    from qcompile.backends.triton.w4a16_gemv import gemv1_eligible

    check = assert_matches_unrounded if gemv1_eligible(m, w[-1]) else (
        lambda o, r, *_: assert_matches(o, r))
    check(w4.w4a16_linear(x, *w, bias=b), ref, x, w)


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g33/asym", "int4/g7/asym"])
@pytest.mark.parametrize("m", [2, 20])
def test_odd_group_size_splits_a_byte(fmt, m):
    """An odd group size puts a byte's two codes in different groups (k = 33: 32 | 33)."""
    x, w, b = _inputs(fmt, m, 96, 131, torch.float32)
    assert_matches(w4.w4a16_linear(x, *w, bias=b), w4.w4a16_linear_ref(x, *w, bias=b))


def test_leading_dims_and_noncontiguous_x():
    x, w, b = _inputs("fp4_e2m1/g128/asym", 40, 96, 576, torch.bfloat16)
    x3 = x.reshape(2, 20, 576)
    ref = w4.w4a16_linear_ref(x3, *w, bias=b)
    assert ref.shape == (2, 20, 96)
    assert_matches(w4.w4a16_linear(x3, *w, bias=b), ref)
    xt = torch.randn(576, 3, device=DEV).t()  # stride (1, 3): not contiguous
    assert_matches(w4.w4a16_linear(xt, *w), w4.w4a16_linear_ref(xt, *w))


def test_empty_rows():
    x, w, b = _inputs("int4/g128", 0, 96, 576, torch.float32)
    out = w4.w4a16_linear(x, *w, bias=b)
    assert out.shape == (0, 96)


@pytest.mark.parametrize("m", [0, 1, 3])
def test_zero_width_rows_give_the_bias(m):
    """K = 0: every route returns the bias (the fused residual added), as the reference does."""
    from qcompile.backends.triton.gemv_fusion import GemvFusion

    _, (packed, table, scale, neg, zero, outer, gs), b = _inputs("int4/g128", 1, 96, 576,
                                                                 torch.float32)
    w0 = (packed[:, :0], table, scale[:, :0], neg, zero, outer, gs)
    x0 = torch.zeros(2, m, 0, device=DEV)
    out = w4.w4a16_linear(x0, *w0, bias=b)
    assert out.shape == (2, m, 96)
    assert torch.equal(out, w4.w4a16_linear_ref(x0, *w0, bias=b))
    assert torch.equal(out, b.expand(2, m, 96))
    res = torch.randn(1, 96, generator=torch.Generator().manual_seed(3)).to(DEV)
    y = w4.w4a16_linear(torch.zeros(1, 0, device=DEV), *w0, bias=b,
                        fusion=GemvFusion(residual=res))
    assert torch.equal(y, (b + res).reshape(1, 96))


@pytest.mark.parametrize("split", [1, 3, 16])
def test_split_counts_agree(monkeypatch, split):
    """Any split count (one, uneven, more splits than K tiles) gives the reference."""
    x, w, b = _inputs("nf4/g64/asym", 5, 200, 1000, torch.float32)
    monkeypatch.setattr(w4, "_pick_split", lambda n, k, device: split)
    assert_matches(w4.w4a16_linear(x, *w, bias=b), w4.w4a16_linear_ref(x, *w, bias=b))


def test_split_k_is_deterministic():
    x, w, b = _inputs("fp4_e2m1/g128/asym", 1, 96, 1000, torch.float32)
    assert w4._pick_split(96, 1000, x.device) > 1  # this is the split-K path
    first = w4.w4a16_linear(x, *w, bias=b)
    for _ in range(2):
        assert torch.equal(w4.w4a16_linear(x, *w, bias=b), first)


def _args(**over):
    x, (packed, table, scale, neg, zero, outer, gs), b = _inputs("int4/g64/asym", 2, 96, 130,
                                                                 torch.float32)
    args = dict(x=x, packed=packed, table=table, scale=scale, scale_neg=neg, zero=zero,
                outer=outer, group_size=gs, bias=b)
    args.update(over)
    return args


@pytest.mark.parametrize("fn", [w4.w4a16_linear, w4.w4a16_linear_ref])
@pytest.mark.parametrize("over,match", [
    (lambda a: {"x": a["x"].to(torch.int32)}, "x has dtype int32"),
    (lambda a: {"packed": a["packed"].to(torch.int8)}, "packed has dtype int8"),
    (lambda a: {"packed": a["packed"][:, :-1]}, r"packed has shape \(96, 64\)"),
    (lambda a: {"packed": torch.zeros(96, 130, dtype=torch.uint8, device=DEV)},
     r"packed has shape \(96, 130\)"),
    (lambda a: {"scale": a["scale"][:, :2]}, r"scale has shape \(96, 2\)"),
    (lambda a: {"group_size": 128}, r"scale has shape \(96, 3\)"),
    (lambda a: {"zero": a["zero"].t().contiguous()}, "zero has shape"),
    (lambda a: {"scale": a["scale"].double()}, "scale has dtype float64"),
    (lambda a: {"table": a["table"][:8]}, "table has shape"),
    (lambda a: {"outer": torch.ones(96, 2, device=DEV)}, "outer has shape"),
    (lambda a: {"bias": a["bias"].bfloat16()}, "bias has dtype bfloat16"),
    (lambda a: {"group_size": 0}, "group_size must be a positive int"),
    (lambda a: {"group_size": -64}, "group_size must be a positive int"),
    (lambda a: {"group_size": 64.0}, "group_size must be a positive int"),
    (lambda a: {"group_size": True}, "group_size must be a positive int"),
])
def test_bad_inputs_raise(fn, over, match):
    args = _args()
    args.update(over(args))
    with pytest.raises(KernelInputError, match=match):
        fn(**args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    args = {k: v.cpu() if torch.is_tensor(v) else v for k, v in _args().items()}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="CUDA"):
        w4.w4a16_linear(**args)
    w4.w4a16_linear_ref(**args)  # the reference runs anywhere


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_mixed_devices_raise():
    args = _args()
    args["scale"] = args["scale"].cpu()
    with pytest.raises(KernelInputError, match="scale is on cpu"):
        w4.w4a16_linear(**args)


# --- batch-1 GEMV with hoisted group scales (w4a16_gemv) -----------------------------------

GEMV1_FORMATS = ["fp4_e2m1/g128", "fp4_e2m1/g128/asym", "int4/g64/asym", "int4/g128",
                 "nf4/g64/asym", "fp4_e2m1/g64/m2", "fp4_e2m1/g128/po2", "fp4_e2m1/channel"]


@pytest.mark.parametrize("fmt", GEMV1_FORMATS)
@pytest.mark.parametrize("k,dtype", [(1024, torch.float32), (1088, torch.bfloat16),
                                     (2112, torch.float16)])
def test_gemv1_matches_reference(fmt, k, dtype):
    """One row with an eligible group size takes the hoisted-scale GEMV (split over K where
    K >= 1024), through ``w4a16_linear``'s dispatch and with FP4 decoded by integer ops."""
    from qcompile.backends.triton import w4a16_gemv as g1

    x, w, b = _inputs(fmt, 1, 200, k, dtype, bias=k != 1088)
    fp4 = fmt.startswith("fp4")
    if fp4:  # the runtime's cached table: what lets the dispatch pick the integer decode
        table = w4.element_table("fp4_e2m1", x.device)
        assert torch.equal(table, w[1])
        w = (w[0], table, *w[2:])
    assert g1.gemv1_eligible(1, w[-1])
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    outs = [w4.w4a16_linear(x, *w, bias=b)] + [
        g1.w4a16_gemv1(x, *w, bias=b, fp4=bits) for bits in ([True, False] if fp4 else [])]
    for out in outs:
        assert_matches_unrounded(out, ref, x, w)


def _arrival_counts(x: torch.Tensor) -> torch.Tensor:
    """The fused split-K reduction's counts on ``x``'s device (made by the first launch)."""
    from qcompile.backends.triton import runtime

    dev = x.device
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) \
        if dev.type == "cuda" else 0
    return runtime._COUNTS[(dev.type, index)]


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128", "fp4_e2m1/g128/asym", "int4/g64/asym"])
@pytest.mark.parametrize("split", [2, 3, 7])
def test_gemv1_reduces_in_its_last_program(monkeypatch, fmt, split):
    """Split over K, the last program of each column tile sums the partials: one launch, the
    same bits as the separate reduce kernel, and the arrival counts are left at zero."""
    from qcompile.backends.triton import runtime
    from qcompile.backends.triton import w4a16_gemv as g1

    x, w, b = _inputs(fmt, 1, 200, 2048, torch.bfloat16, bias=True)
    fp4 = fmt.startswith("fp4")
    if fp4:
        w = (w[0], w4.element_table("fp4_e2m1", x.device), *w[2:])
    spy = _Spy(g1._splitk_reduce_kernel)
    monkeypatch.setattr(g1, "_splitk_reduce_kernel", spy)
    fused = g1.w4a16_gemv1(x, *w, bias=b, fp4=fp4, split=split)
    assert spy.launches == 0
    assert not _arrival_counts(x).any()
    monkeypatch.setattr(runtime, "FUSED_REDUCE", False)
    separate = g1.w4a16_gemv1(x, *w, bias=b, fp4=fp4, split=split)
    assert spy.launches == 1
    assert torch.equal(fused, separate)
    assert_matches_unrounded(fused, w4.w4a16_linear_ref(x, *w, bias=b), x, w)


@pytest.mark.parametrize("m", [2, 7, 16])
def test_gemv_reduces_in_its_last_program(monkeypatch, m):
    """The general split-K GEMV (2..16 rows) sums its partials in place too: the same bits
    as with the reduce kernel, which is then not launched."""
    from qcompile.backends.triton import runtime
    from qcompile.backends.triton import w4a16_gemv as g1

    x, w, b = _inputs("fp4_e2m1/g128/asym", m, 200, 1000, torch.float16, bias=True)
    monkeypatch.setattr(w4, "_pick_split", lambda n, k, device: 3)
    spy = _Spy(w4._splitk_reduce_kernel)
    monkeypatch.setattr(w4, "_splitk_reduce_kernel", spy)
    fused = w4.w4a16_linear(x, *w, bias=b)
    assert spy.launches == 0 and not _arrival_counts(x).any()
    monkeypatch.setattr(runtime, "FUSED_REDUCE", False)
    separate = w4.w4a16_linear(x, *w, bias=b)
    assert spy.launches == 1
    assert torch.equal(fused, separate)
    assert_matches(fused, w4.w4a16_linear_ref(x, *w, bias=b))
    assert not g1.gemv1_eligible(m, 128)


class _Spy:
    """Counts launches of a JIT kernel and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

    def __getattr__(self, name):  # an autotuner's best_config, ...
        return getattr(self.__dict__["kernel"], name)


def _spy_tuned(monkeypatch, module, kernel: str, tuned: str) -> _Spy:
    """A spy on ``module.<kernel>`` for both launch paths: direct (the interpreter) and through
    the cached autotuner ``module.<tuned>(group_size, ...)`` (CUDA), which is built around the real
    kernel: an autotuner built around the spy itself fails (a spy has no ``arg_names``)."""
    real, make = getattr(module, kernel), getattr(module, tuned)
    spy = _Spy(real)

    def spied_tuned(*args):
        with monkeypatch.context() as m:
            m.setattr(module, kernel, real)
            spy.kernel = make(*args)
        return spy

    monkeypatch.setattr(module, kernel, spy)
    monkeypatch.setattr(module, tuned, spied_tuned)
    return spy


# --- prefill: decode the weight once, then cuBLAS (w4a16_dequant) -----------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("k", "dtype"), [(576, torch.bfloat16), (131, torch.float32),
                                          (1000, torch.float16)])
def test_dequant_is_the_reference_weight(fmt, k, dtype):
    """The decoded weight is the reference's fp32 dequantization rounded to ``dtype``, bit for
    bit (odd K, ragged last groups, every scale kind)."""
    from qcompile.backends.triton.w4a16_dequant import w4a16_dequant

    packed, table, scale, neg, zero, outer, gs = _weights(fmt, 200, k)
    want = w4._dequant_ref(packed, table, scale, neg, zero, outer, gs, k).to(dtype)
    runs = [(table, None)]
    if parse_format(fmt).elem == "fp4_e2m1":  # the cached table selects the FP4 kernels
        fp4 = w4.element_table("fp4_e2m1", DEV)
        runs += [(fp4, None), (fp4, "pairs"), (fp4, "words"), (fp4, "flat")]
    for t, kernel in runs:
        got = w4a16_dequant(packed, t, scale, neg, zero, outer, gs, k, dtype, kernel=kernel)
        assert got.dtype == dtype and torch.equal(got, want), kernel


@pytest.mark.parametrize("tile", range(len(__import__(
    "qcompile.backends.triton.w4a16_dequant", fromlist=["x"]).FP4W_CONFIGS)))
@pytest.mark.parametrize(("fmt", "k"), [
    ("fp4_e2m1/g32/asym", 1000),  # whole groups in a tile; K ragged past the last tile
    ("fp4_e2m1/g1024/m2", 2056),  # tiles inside one group (ragged last group), outer scales
    ("fp4_e2m1/g40", 400),  # groups that tile no BLOCK_K: a scale per word
    ("nvfp4", 520)])
def test_dequant_fp4_word_kernel_every_tile(monkeypatch, tile, fmt, k):
    """Each autotune tile of the FP4 word kernel, in each of its scale layouts, decodes the
    reference weight bit for bit (N not a multiple of any BLOCK_N)."""
    from qcompile.backends.triton import w4a16_dequant as dq

    cfg = dq.FP4W_CONFIGS[tile]
    monkeypatch.setattr(dq, "FP4W_CONFIGS", [cfg])  # the interpreter's tile
    if DEV.type == "cuda":
        import triton

        monkeypatch.setattr(dq, "_dequant_fp4w_tuned", triton.autotune(
            [cfg], key=["N", "K", "GROUP_SIZE"])(dq._dequant_fp4w_kernel))
    packed, _, scale, neg, zero, outer, gs = _weights(fmt, 37, k)
    table = w4.element_table("fp4_e2m1", DEV)
    want = w4._dequant_ref(packed, table, scale, neg, zero, outer, gs, k).to(torch.bfloat16)
    assert torch.equal(dq.w4a16_dequant(packed, table, scale, neg, zero, outer, gs, k,
                                        torch.bfloat16, kernel="words"), want)


@pytest.mark.parametrize(("fmt", "k", "words"), [
    ("fp4_e2m1/g128/asym", 1000, True), ("fp4_e2m1/g32/m2", 576, True),
    ("nvfp4", 1000, True), ("fp4_e2m1/channel", 1000, True),
    ("fp4_e2m1/g128", 131, False),  # K not a multiple of 8: no int32 words
    ("int4/g64/asym", 576, False)])
@pytest.mark.parametrize("kernel", ["pairs", "words", "flat"])
def test_dequant_takes_the_fp4_word_kernel(monkeypatch, fmt, k, words, kernel):
    """The cached FP4 table, whole-word groups and K % 8 == 0 take the FP4 kernel asked for
    (pairs, words or flat); the rest the general decode; all bit-exact (above)."""
    from qcompile.backends.triton import w4a16_dequant as dq

    names = ("_dequant_fp4p_kernel", "_dequant_fp4w_kernel", "_dequant_fp4w_tuned",
             "_dequant_fp4f_kernel", "_dequant_fp4f_tuned", "_dequant_kernel")
    spies = {name: _Spy(getattr(dq, name)) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(dq, name, spy)
    packed, table, scale, neg, zero, outer, gs = _weights(fmt, 64, k)
    if parse_format(fmt).elem == "fp4_e2m1":
        table = w4.element_table("fp4_e2m1", DEV)
    got = dq.w4a16_dequant(packed, table, scale, neg, zero, outer, gs, k, torch.bfloat16,
                           kernel=kernel)
    want = w4._dequant_ref(packed, table, scale, neg, zero, outer, gs, k).to(torch.bfloat16)
    assert torch.equal(got, want)
    # The word kernel directly under the interpreter, through its autotuner on CUDA.
    word_launches = spies["_dequant_fp4w_kernel"].launches + spies["_dequant_fp4w_tuned"].launches
    assert word_launches == int(words and kernel == "words")
    assert spies["_dequant_fp4p_kernel"].launches == int(words and kernel == "pairs")
    flat_launches = spies["_dequant_fp4f_kernel"].launches + spies["_dequant_fp4f_tuned"].launches
    assert flat_launches == int(words and kernel == "flat")
    assert spies["_dequant_kernel"].launches == int(not words)


def test_dequant_fp4_kernel_default_and_timed_choice(monkeypatch):
    """Where nothing can be timed (the interpreter, CPU) the flat kernel runs; on a GPU all
    three are timed at the first call of a shape and the choice is kept under its key."""
    from qcompile.backends.triton import path_tuning
    from qcompile.backends.triton import w4a16_dequant as dq

    spy = _Spy(dq._dequant_fp4f_kernel)
    monkeypatch.setattr(dq, "_dequant_fp4f_kernel", spy)
    path_tuning.clear()
    packed, _, scale, neg, zero, outer, gs = _weights("fp4_e2m1/g128/asym", 64, 512)
    table = w4.element_table("fp4_e2m1", DEV)
    got = dq.w4a16_dequant(packed, table, scale, neg, zero, outer, gs, 512, torch.bfloat16)
    want = w4._dequant_ref(packed, table, scale, neg, zero, outer, gs, 512).to(torch.bfloat16)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="kernel must be one of"):
        dq.w4a16_dequant(packed, table, scale, neg, zero, outer, gs, 512, torch.bfloat16,
                         kernel="fast")
    keys = [key for key in path_tuning.choices() if key[0] == "w4a16-dequant-fp4"]
    if DEV.type == "cuda":
        assert len(keys) == 1 and path_tuning.choices()[keys[0]] in dq.FP4_KERNELS
    else:
        assert keys == [] and spy.launches == 1
    path_tuning.clear()


@pytest.mark.parametrize("timed", [False, True])
def test_dequant_fp4_untimed_flat_skips_its_autotuner(monkeypatch, timed):
    """On a GPU where nothing can be timed (the first call inside a CUDA-graph capture) the
    flat kernel launches with its fixed config, not through its autotuner (which would time
    its configs); once the shape is timed, the autotuner. The launches are recorded, not run
    (the wrapper's GPU branch on any device)."""
    from qcompile.backends.triton import path_tuning
    from qcompile.backends.triton import w4a16_dequant as dq

    launched = []
    monkeypatch.setattr(dq, "interpreting", lambda: False)
    monkeypatch.setattr(dq, "launch", lambda kern, grid, *a, **kw: launched.append(
        (kern, grid, kw.get("BLOCK"), kw.get("num_warps"))))
    monkeypatch.setattr(path_tuning, "ENABLED", True)  # the suite's conftest turns it off
    monkeypatch.setattr(path_tuning, "_can_time", lambda device: timed)
    monkeypatch.setattr(path_tuning, "_time_ms", lambda call, cold=False: {
        "pairs": 3.0, "words": 2.0, "flat": 1.0}[call.args[0]])
    monkeypatch.setattr(path_tuning, "agrees", lambda out, want: True)
    path_tuning.clear()
    packed, _, scale, neg, zero, outer, gs = _weights("fp4_e2m1/g128/asym", 64, 512)
    table = w4.element_table("fp4_e2m1", DEV)
    dq.w4a16_dequant(packed, table, scale, neg, None, outer, gs, 512, torch.bfloat16)
    words = 64 * 512 // 8
    if timed:  # each kernel once for its timing, then the choice, through the autotuner
        assert [k for k, *_ in launched] == [dq._dequant_fp4f_tuned, dq._dequant_fp4p_kernel,
                                             dq._dequant_fp4w_tuned, dq._dequant_fp4f_tuned]
        assert path_tuning.choice(next(iter(path_tuning.choices()))) == "flat"
    else:
        block = dq.FP4F_UNTIMED.kwargs["BLOCK"]
        assert launched == [(dq._dequant_fp4f_kernel, (-(-words // block),), block,
                             dq.FP4F_UNTIMED.num_warps)]
        assert path_tuning.choices() == {}
    path_tuning.clear()


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128/asym", "int4/g64/asym", "fp4_e2m1/g32/m2"])
def test_prefill_takes_dequant_and_cublas(monkeypatch, fmt):
    """From DEQUANT_MIN_M rows, w4a16_linear decodes W and calls F.linear (spied), matching the
    reference to summation order; one row fewer takes the tiled GEMM."""
    from qcompile.backends.triton import w4a16_dequant as dq

    monkeypatch.setattr(dq, "DEQUANT_MIN_M", 40)  # small enough for the interpreter
    calls = []
    real = dq.w4a16_dequant
    monkeypatch.setattr(dq, "w4a16_dequant", lambda *a: calls.append(a[-2:]) or real(*a))
    for m, used in ((40, True), (39, False)):
        x, w, b = _inputs(fmt, m, 96, 1000, torch.bfloat16)
        calls.clear()
        assert_matches(w4.w4a16_linear(x, *w, bias=b), w4.w4a16_linear_ref(x, *w, bias=b))
        assert calls == ([(1000, torch.bfloat16)] if used else [])


@pytest.mark.parametrize(("fmt", "k", "words"), [
    ("fp4_e2m1/g128/asym", 1088, True),  # ragged last group, two groups per tile
    ("fp4_e2m1/g64", 2048, True),  # four groups per tile, split over K
    ("fp4_e2m1/channel", 1024, True),  # tiles inside one group
    ("fp4_e2m1/g64/m2", 1024, True),  # outer (per-channel) scale
    ("fp4_e2m1/g64", 1092, False),  # K % 8 != 0: the byte kernel
    ("int4/g64/asym", 1024, False),  # a table format: the byte kernel
])
def test_gemv1_fp4_words(monkeypatch, fmt, k, words):
    """FP4 rows whose K is a multiple of 8 are read as int32 words, eight codes at a time
    (``_gemv1_fp4w_kernel``); the rest take the byte kernel. Both match the reference."""
    from qcompile.backends.triton import w4a16_gemv as g1

    spy_w = _spy_tuned(monkeypatch, g1, "_gemv1_fp4w_kernel", "_tuned_fp4w")
    spy_b = _spy_tuned(monkeypatch, g1, "_gemv1_kernel", "_tuned")
    x, w, b = _inputs(fmt, 1, 72, k, torch.float32, bias=True)
    if fmt.startswith("fp4"):
        w = (w[0], w4.element_table("fp4_e2m1", x.device), *w[2:])
    out = w4.w4a16_linear(x, *w, bias=b)
    assert (spy_w.launches, spy_b.launches) == ((1, 0) if words else (0, 1))
    assert_matches_unrounded(out, w4.w4a16_linear_ref(x, *w, bias=b), x, w)


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128/asym", "fp4_e2m1/g64/m2", "fp4_e2m1/g128"])
@pytest.mark.parametrize("k", [1024, 1088, 2304])
def test_gemv1_fp4_words_pipelined_gives_the_same_bits(monkeypatch, fmt, k):
    """Software-pipelining the K loop (``PIPE``) changes when words are read, not what is
    summed: the same bits as the same tile without it, over splits whose tile counts differ
    (one tile, several, a ragged last one). On CUDA every word-kernel config runs (each also
    against the reference); in the interpreter one tile, both ways."""
    import triton

    from qcompile.backends.triton import w4a16_gemv as g1

    x, w, b = _inputs(fmt, 1, 72, k, torch.bfloat16, bias=True)
    w = (w[0], w4.element_table("fp4_e2m1", x.device), *w[2:])
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    if CUDA:
        pairs = [(triton.Config(dict(c.kwargs, PIPE=1), num_warps=c.num_warps,
                                num_stages=c.num_stages), c)
                 for c in g1._fp4w_configs(w[-1]) if c.kwargs["PIPE"] > 1]
        assert pairs
        for c in g1._fp4w_configs(w[-1]):
            assert_matches_unrounded(g1.w4a16_gemv1(x, *w, bias=b, fp4=True, config=c), ref,
                                     x, w)
        runs = [[[g1.w4a16_gemv1(x, *w, bias=b, fp4=True, split=split, config=c)
                  for split in (1, 3, 16)] for c in pair] for pair in pairs]
    else:
        runs = []
        for pipe in (1, 3):
            monkeypatch.setattr(g1, "_INTERP_FP4W", {"BLOCK_N": 16, "BLOCK_K": 128,
                                                     "PIPE": pipe, "STAGE": False})
            runs.append([g1.w4a16_gemv1(x, *w, bias=b, fp4=True, split=split)
                         for split in (1, 3, 16)])
        runs = [runs]
    for off, on in runs:
        for a, c in zip(off, on, strict=True):
            assert torch.equal(a, c)
        assert_matches_unrounded(on[1], ref, x, w)


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128/asym", "fp4_e2m1/g128"])
@pytest.mark.parametrize("k", [1024, 1088])
def test_gemv1_fp4_words_staged_x_gives_the_same_bits(monkeypatch, fmt, k):
    """Loading the tile's x once as a vector and splitting it by nibble (``STAGE``) feeds
    every product the same x as the per-nibble loads: the same bits, split or not (on CUDA
    for every tile, in the interpreter for one)."""
    import triton

    from qcompile.backends.triton import w4a16_gemv as g1

    x, w, b = _inputs(fmt, 1, 72, k, torch.bfloat16, bias=True)
    w = (w[0], w4.element_table("fp4_e2m1", x.device), *w[2:])
    if CUDA:
        staged = [c for c in g1._fp4w_configs(w[-1]) if c.kwargs["STAGE"]]
        assert staged
        pairs = [(triton.Config(dict(c.kwargs, STAGE=False), num_warps=c.num_warps,
                                num_stages=c.num_stages), c) for c in staged]
        runs = [[[g1.w4a16_gemv1(x, *w, bias=b, fp4=True, split=split, config=c)
                  for split in (1, 3)] for c in pair] for pair in pairs]
    else:
        runs = [[]]
        for stage in (False, True):
            monkeypatch.setattr(g1, "_INTERP_FP4W", {"BLOCK_N": 16, "BLOCK_K": 128,
                                                     "PIPE": 1, "STAGE": stage})
            runs[0].append([g1.w4a16_gemv1(x, *w, bias=b, fp4=True, split=split)
                            for split in (1, 3)])
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    for off, on in runs:
        for a, c in zip(off, on, strict=True):
            assert torch.equal(a, c)
        assert_matches_unrounded(on[0], ref, x, w)


def test_gemv1_takes_only_what_it_can():
    from qcompile.backends.triton import w4a16_gemv as g1

    assert not g1.gemv1_eligible(2, 128)  # two rows: the general GEMV
    assert not g1.gemv1_eligible(1, 16)  # NVFP4's g16: smaller than any BLOCK_K
    assert not g1.gemv1_eligible(1, 1000)  # per-channel K = 1000
    assert g1.gemv1_eligible(1, 128)


def test_gemv1_split_is_deterministic():
    x, w, b = _inputs("fp4_e2m1/g128/asym", 1, 96, 2048, torch.float32)
    first = w4.w4a16_linear(x, *w, bias=b)
    for _ in range(2):
        assert torch.equal(w4.w4a16_linear(x, *w, bias=b), first)


def test_gemv1_tunes_the_split_with_the_tile():
    """The batch-1 autotuner's candidates: every tile with every split of SPLITS (tile-major,
    so the first is the first tile unsplit), or with one fixed split; splits past the K tile
    count are pruned, a fixed one never."""
    from qcompile.backends.triton import w4a16_gemv as g1

    tiles = g1._fp4w_configs(128)
    cands = g1._with_splits(tiles, None)
    assert len(cands) == len(tiles) * len(g1.SPLITS)
    assert cands[0].kwargs == {**tiles[0].kwargs, "SPLIT": 1}
    assert [c.kwargs["SPLIT"] for c in cands[:len(g1.SPLITS)]] == list(g1.SPLITS)
    for c, t in zip(cands[::len(g1.SPLITS)], tiles, strict=True):
        assert (c.num_warps, c.num_stages) == (t.num_warps, t.num_stages)
    assert {c.kwargs["SPLIT"] for c in g1._with_splits(tiles, 3)} == {3}
    kept = g1._prune_splits(cands, {"K": 4096})
    assert kept and all(c.kwargs["SPLIT"] <= -(-4096 // c.kwargs["BLOCK_K"]) for c in kept)
    assert {(c.kwargs["BLOCK_K"], c.kwargs["SPLIT"]) for c in cands} - \
        {(c.kwargs["BLOCK_K"], c.kwargs["SPLIT"]) for c in kept} == \
        {(2048, 4), (2048, 8), (1024, 8)}
    fixed = g1._with_splits(tiles, 16)
    assert g1._prune_splits(fixed, {"K": 1024}) == fixed


@pytest.mark.skipif(CUDA, reason="drives the interpreter's kernels through the tuned path")
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("fmt", "tuned_name", "kernel_name"), [
    ("fp4_e2m1/g128/asym", "_tuned_fp4w", "_gemv1_fp4w_kernel"),
    ("int4/g64/asym", "_tuned", "_gemv1_kernel")])
def test_gemv1_follows_the_split_its_autotuner_picked(monkeypatch, fmt, tuned_name,
                                                      kernel_name, fused):
    """On the autotuned path the wrapper sizes the partials for any split of SPLITS and, when
    it cannot sum them in place, launches the reduce kernel with the split the autotuner
    picked (its ``best_config``): the same bits as that split pinned."""
    import triton

    from qcompile.backends.triton import runtime
    from qcompile.backends.triton import w4a16_gemv as g1

    x, w, b = _inputs(fmt, 1, 200, 2048, torch.float32, bias=True)
    fp4 = fmt.startswith("fp4")
    if fp4:
        w = (w[0], w4.element_table("fp4_e2m1", x.device), *w[2:])
    want = g1.w4a16_gemv1(x, *w, bias=b, fp4=fp4, split=3)  # the interpreter's path
    interp = g1._INTERP_FP4W if fp4 else g1._INTERP
    picked = triton.Config(dict(interp, SPLIT=3))
    asked = []
    monkeypatch.setattr(g1, tuned_name, lambda gs, split=None: asked.append(split)
                        or _Pinned(getattr(g1, kernel_name), picked))
    monkeypatch.setattr(g1, "interpreting", lambda: False)  # take the CUDA (tuned) path
    monkeypatch.setattr(runtime, "FUSED_REDUCE", fused)
    spy = _Spy(g1._splitk_reduce_kernel)
    monkeypatch.setattr(g1, "_splitk_reduce_kernel", spy)
    got = g1.w4a16_gemv1(x, *w, bias=b, fp4=fp4)
    assert asked == [None]
    assert spy.launches == int(not fused)
    assert torch.equal(got, want)


def test_tuning_first_keeps_the_first_surviving_config(monkeypatch):
    import triton

    from qcompile.backends.triton import runtime
    from qcompile.backends.triton.runtime import tuning

    monkeypatch.delenv("QCOMPILE_TRITON_TUNE", raising=False)  # gpu_checks.sh sets it
    # A pruning to one config marks the timing that follows it (Triton 3.6); none follows
    # here, so the mark is put back as it was for the next test.
    monkeypatch.setattr(runtime._PRUNED, "single", False, raising=False)
    configs = [triton.Config({"A": i}) for i in range(4)]
    prune = tuning(lambda cs, named, **kw: cs[1:])["early_config_prune"]
    assert [c.kwargs["A"] for c in prune(configs, {})] == [1, 2, 3]
    monkeypatch.setenv("QCOMPILE_TRITON_TUNE", "first")
    assert [c.kwargs["A"] for c in prune(configs, {})] == [1]
    assert [c.kwargs["A"] for c in tuning()["early_config_prune"](configs, {})] == [0]


def test_graph_bench_falls_back_to_eager_timing(monkeypatch, caplog):
    """Autotuning times CUDA-graph replays; where a capture is refused (the model itself run
    under CUDA graphs), it times eagerly instead of failing the call."""
    import triton.testing

    from qcompile.backends.triton.runtime import graph_bench

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda fn, rep, quantiles: calls.append("graph") or 2.0)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, quantiles: calls.append("eager") or 3.0)
    assert graph_bench(lambda: None, None) == 2.0 and calls == ["graph"]

    def refuse(fn, rep, quantiles):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", refuse)
    with caplog.at_level("WARNING"):
        assert graph_bench(lambda: None, [0.5]) == 3.0
    assert calls == ["graph", "eager"] and "timing eagerly" in caplog.text


class _Pinned:
    """Stands in for an autotuner: launches ``kernel`` with one fixed config."""

    def __init__(self, kernel, config):
        self.kernel, self.config = kernel, config
        self.best_config = config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(kwargs, **self.config.kwargs)
            grid_t = grid(meta) if callable(grid) else grid
            return self.kernel[grid_t](*args, **meta, num_warps=self.config.num_warps,
                                       num_stages=self.config.num_stages)
        return launch


def test_fp32_activations_get_gemm_configs_that_fit():
    """With fp32 activations every GEMM bucket keeps some configs, each within the stage and
    weight-tile limits (the first candidate, all that QCOMPILE_TRITON_TUNE=first keeps, ran out
    of shared memory on an H100 at four stages); bf16 keeps the table as it is."""
    for bucket, configs in w4.GEMM_CONFIGS.items():
        fp32 = w4._fit_x_dtype(configs, {"x_ptr": torch.empty(0, dtype=torch.float32)})
        assert fp32, bucket
        for c in fp32:
            assert c.num_stages <= w4.FP32_MAX_STAGES
            assert c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= w4.FP32_MAX_W_TILE
        kept = {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in fp32}
        assert kept <= {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in configs}
        assert w4._fit_x_dtype(configs, {"x_ptr": torch.empty(0, dtype=torch.bfloat16)}) \
            == configs
    import triton

    big = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8})]
    with pytest.raises(ValueError, match="fits fp32 activations"):
        w4._fit_x_dtype(big, {"x_ptr": torch.empty(0, dtype=torch.float32)})


@pytest.mark.skipif(not CUDA, reason="needs CUDA: every autotune config on the GPU")
def test_every_config_matches_the_reference(monkeypatch):
    """The numerics grid may run one config per kernel (QCOMPILE_TRITON_TUNE=first); here
    every config of the GEMV buckets, the GEMM buckets and the batch-1 GEMV runs once."""
    from qcompile.backends.triton import w4a16_gemv as g1

    cases = [(kind, bucket, c) for kind, table in (("gemv", w4.GEMV_CONFIGS),
                                                   ("gemm", w4.GEMM_CONFIGS))
             for bucket, cs in table.items() for c in cs]
    from qcompile.backends.triton import w4a16_dequant as dq

    monkeypatch.setattr(dq, "DEQUANT_MIN_M", 1 << 30)  # every GEMM bucket through the GEMM
    for kind, bucket, config in cases:
        kernel = w4._w4a16_gemv_kernel if kind == "gemv" else w4._w4a16_gemm_kernel
        monkeypatch.setattr(w4, "_tuned", lambda *a, k=kernel, c=config: _Pinned(k, c))
        m = min(bucket, 16) if kind == "gemv" else min(bucket, 300)
        for fmt in ("fp4_e2m1/g128/asym", "int4/g64/asym", "fp4_e2m1/g32/m2"):
            x, w, b = _inputs(fmt, m, 200, 1000, torch.bfloat16)
            with monkeypatch.context() as mp:
                mp.setattr(g1, "gemv1_eligible", lambda *a: False)
                assert_matches(w4.w4a16_linear(x, *w, bias=b),
                               w4.w4a16_linear_ref(x, *w, bias=b))
    import triton

    for config in g1.GEMV1_CONFIGS:
        config = triton.Config({**config.kwargs, "SPLIT": 2}, num_warps=config.num_warps,
                               num_stages=config.num_stages)
        monkeypatch.setattr(g1, "_tuned",
                            lambda gs, split=None, c=config: _Pinned(g1._gemv1_kernel, c))
        gs = max(128, config.kwargs["BLOCK_K"])
        for fmt in (f"fp4_e2m1/g{gs}/asym", f"int4/g{gs}/asym"):
            x, w, b = _inputs(fmt, 1, 200, 2048, torch.bfloat16)
            assert_matches_unrounded(w4.w4a16_linear(x, *w, bias=b),
                                     w4.w4a16_linear_ref(x, *w, bias=b), x, w)


# --- the tiled GEMM with swapped operands (w4a16_swap) -------------------------------------------

_SWAP_CASES = [(1, 96, 1000, torch.bfloat16), (7, 200, 130, torch.float16),
               (33, 200, 576, torch.bfloat16), (40, 70, 131, torch.bfloat16)] + (
    [(4097, 200, 1000, torch.bfloat16), (300, 256, 8192, torch.float16)] if CUDA else [])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k,dtype", _SWAP_CASES,
                         ids=[f"m{m}-n{n}-k{k}-{str(d)[6:]}" for m, n, k, d in _SWAP_CASES])
def test_swapped_gemm_matches_reference(fmt, m, n, k, dtype):
    """``path="swap"``: every format, odd M, N and K, ragged groups, bf16 and fp16, with and
    without bias; the same rounding of each weight as the reference."""
    x, w, b = _inputs(fmt, m, n, k, dtype, bias=(m + k) % 2 == 0, seed=3)
    assert_matches(w4.w4a16_linear(x, *w, bias=b, path="swap"),
                   w4.w4a16_linear_ref(x, *w, bias=b))


def test_forced_paths_agree_and_bad_paths_raise():
    """Every forced path of one M gives the reference (to summation order); an unknown path
    and fp32 activations on the swapped kernel are refused by name."""
    x, w, b = _inputs("fp4_e2m1/g128/asym", 20, 96, 576, torch.bfloat16)
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    for path in (None, "gemm", "dequant", "swap"):
        assert_matches(w4.w4a16_linear(x, *w, bias=b, path=path), ref)
    with pytest.raises(KernelInputError, match="path must be 'gemm', 'dequant', 'swap'"):
        w4.w4a16_linear(x, *w, bias=b, path="cublas")
    with pytest.raises(KernelInputError, match="path 'swap' needs bf16 or fp16"):
        w4.w4a16_linear(x.float(), *w, bias=None, path="swap")
