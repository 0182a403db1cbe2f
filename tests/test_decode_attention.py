"""Decode attention: the kernel (:mod:`qcompile.backends.triton.decode_attention`), the
``qcompile::decode_attention`` op and ``lower-triton``'s rewrite of one-query-row SDPAs.

The kernel runs under Triton's interpreter on the CPU and natively on CUDA, against the
op's reference (``repeat_kv`` + SDPA in fp32). The rewrite is checked on small exported
graphs (each rule, including what it must leave alone) and end to end: a tiny Llama's
static-cache ``generate()`` through the ``qcompile`` backend gives the same tokens lowered or
not, with the attention of its decode graphs lowered.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.api import quantize_graph
from qcompile.backends.triton.ops import decode_attention_ref
from qcompile.testing import tiny_model

Q = torch.ops.qcompile
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _qkv(b, hq, hkv, n, dk, dv, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, hq, dk, generator=gen).transpose(1, 2)  # a strided view, as in graphs
    k = torch.randn(b, hkv, n, dk, generator=gen)
    v = torch.randn(b, hkv, n, dv, generator=gen) * 2
    return (t.to(dtype=dtype, device=device) for t in (q, k, v))


def _mask(kind: str, b: int, hq: int, n: int, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "prefix":  # a static cache: positions up to the current one, broadcast view
        return (torch.arange(n) <= (2 * n) // 3).view(1, 1, 1, n).expand(b, 1, 1, n).to(device)
    if kind == "heads":  # one boolean row per head, some false everywhere but position 0
        m = torch.rand(b, hq, 1, n, generator=gen) > 0.4
        m[..., 0] = True
        return m.to(device)
    add = torch.randn(1, 1, 1, n, generator=gen)  # additive, -inf at the end
    add[..., n - max(1, n // 4):] = float("-inf")
    return add.to(dtype=dtype, device=device)


def _ref32(q, k, v, mask, scale=None):
    m = mask if mask is None or mask.dtype == torch.bool else mask.float()
    return decode_attention_ref(q.float(), k.float(), v.float(), m, scale)


_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
        torch.float16: dict(atol=3e-3, rtol=2e-3)}
SHAPES = [  # (batch, query heads, kv heads, cache length, head_dim, value head_dim)
    (1, 4, 2, 37, 16, 16),
    (2, 6, 2, 100, 24, 40),
    (1, 3, 3, 5, 8, 8),
    (1, 7, 1, 1, 16, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "prefix", "heads", "additive"])
def test_kernel_matches_reference(kernel_device, shape, dtype, mask):
    """Every mask kind, one run and split runs (combined by the last arrival, several runs
    per load at 8; runs past the cache's end with none), odd head counts, head dims and cache
    lengths (down to one position)."""
    from qcompile.backends.triton.decode_attention import decode_attention

    device = kernel_device
    b, hq, hkv, n, dk, dv = shape
    q, k, v = _qkv(b, hq, hkv, n, dk, dv, dtype, device)
    m = _mask(mask, b, hq, n, dtype, device)
    ref = _ref32(q, k, v, m, 0.3)
    for splits in (1, 4, 8):
        out = decode_attention(q, k, v, m, 0.3, splits=splits)
        assert out.shape == (b, hq, 1, dv) and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, **_TOL[dtype])


@pytest.mark.parametrize("mask", ["prefix", "additive"])
@pytest.mark.parametrize("splits", [1, 4])
def test_masked_off_blocks_are_not_read(kernel_device, mask, splits):
    """A static cache's positions past the current one (whole masked-off blocks) are never
    loaded: NaN there leaves the result equal to attention over the live prefix."""
    from qcompile.backends.triton.decode_attention import decode_attention

    device = kernel_device
    n, live = 200, 64  # blocks of 32 under the interpreter: positions >= 64 in dead blocks
    q, k, v = _qkv(1, 4, 2, n, 16, 16, torch.float32, device)
    if mask == "prefix":
        m = (torch.arange(n, device=device) < live).view(1, 1, 1, n)
    else:
        m = torch.where(torch.arange(n, device=device) < live, 0.0, float("-inf")).view(1, 1, 1, n)
    k[:, :, live:] = float("nan")
    v[:, :, live:] = float("nan")
    want = decode_attention_ref(q, k[:, :, :live], v[:, :, :live], m[..., :live])
    for ahead in (0, 1, 2):  # loads issued in their block, or one block ahead
        out = decode_attention(q, k, v, m, None, splits=splits, block_l=32, ahead=ahead)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", ["none", "heads", "additive"])
@pytest.mark.parametrize("block_l", [32, 64])
def test_loading_ahead_gives_the_same_bits(kernel_device, mask, block_l):
    """The block loop's load orders (each load where it is used; the next block's mask and
    this block's values early; also the next block's keys and values) compute the same thing
    in the same order: equal bits, split or not, with a cache write."""
    from qcompile.backends.triton.decode_attention import CacheWrite, decode_attention
    from qcompile.backends.triton.runtime import KernelInputError

    device = kernel_device
    n = 150
    q, k, v = _qkv(1, 4, 2, n, 16, 16, torch.bfloat16, device)
    m = _mask(mask, 1, 4, n, torch.bfloat16, device)
    gen = torch.Generator().manual_seed(5)
    kn, vn = (torch.randn(1, 2, 1, 16, generator=gen).to(device, torch.bfloat16)
              for _ in range(2))
    idx = torch.tensor([n - 60], device=device)
    for splits in (1, 4):
        got = {}
        for ahead in (0, 1, 2):
            kc, vc = k.clone(), v.clone()
            got[ahead] = (decode_attention(q, kc, vc, m, None, splits=splits, block_l=block_l,
                                           write=CacheWrite(idx, kn, vn), ahead=ahead), kc, vc)
        for ahead in (1, 2):
            for a, b in zip(got[0], got[ahead], strict=True):
                assert torch.equal(a, b)
    with pytest.raises(KernelInputError, match="ahead must be 0, 1 or 2"):
        decode_attention(q, k, v, m, None, block_l=block_l, ahead=3)


def test_rows_with_nothing_to_attend_give_zeros(kernel_device):
    """As PyTorch's math attention: a head whose mask is false everywhere gets zeros."""
    from qcompile.backends.triton.decode_attention import decode_attention

    device = kernel_device
    q, k, v = _qkv(1, 4, 2, 70, 16, 16, torch.float32, device)
    m = torch.ones(1, 4, 1, 70, dtype=torch.bool, device=device)
    m[:, 2] = False
    ref = decode_attention_ref(q, k, v, m)
    for splits in (1, 2):
        out = decode_attention(q, k, v, m, splits=splits)
        assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_strided_cache_and_mask_views(kernel_device):
    """The cache as a slice of a longer buffer, q transposed, a mask broadcast over heads
    and batch: read through their strides, no copies needed."""
    from qcompile.backends.triton.decode_attention import decode_attention

    device = kernel_device
    _, kbuf, vbuf = _qkv(2, 4, 2, 90, 16, 16, torch.float32, device)
    k, v = kbuf[:, :, 10:80], vbuf[:, :, 10:80]
    q = torch.randn(2, 1, 4, 16, device=device).transpose(1, 2)
    m = (torch.arange(70, device=device) < 50).view(1, 1, 1, 70).expand(2, 4, 1, 70)
    assert not k.is_contiguous() and m.stride(0) == 0
    torch.testing.assert_close(decode_attention(q, k, v, m, splits=2),
                               decode_attention_ref(q, k, v, m), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("per_batch", [False, True])
def test_kernel_rotates_queries(kernel_device, dtype, per_batch):
    """``cos``/``sin`` given: the queries are rotated in the kernel (fp32, rounded once to
    q's dtype) before the scores; the tables may be one per batch row or shared."""
    from qcompile.backends.triton.decode_attention import decode_attention
    from qcompile.backends.triton.ops import rope

    device = kernel_device
    b, hq, hkv, n, d = 2, 6, 2, 45, 32
    q, k, v = _qkv(b, hq, hkv, n, d, d, dtype, device)
    pos = torch.tensor([7.0, 30.0]) if per_batch else torch.tensor([12.0])
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2) / d)
    ang = torch.cat([pos[:, None] * freq] * 2, -1).view(-1, 1, 1, d)
    cos, sin = (t.to(dtype=dtype, device=device) for t in (ang.cos(), ang.sin()))
    m = _mask("prefix", b, hq, n, dtype, device)
    ref = _ref32(rope(q.float(), cos.float(), sin.float()).to(dtype), k, v, m)
    for splits in (1, 2):
        out = decode_attention(q, k, v, m, splits=splits, cos=cos, sin=sin)
        torch.testing.assert_close(out.float(), ref, **_TOL[dtype])
    assert torch.equal(Q.decode_attention(q.cpu(), k.cpu(), v.cpu(), m.cpu(), None, False,
                                          cos.cpu(), sin.cpu()),
                       decode_attention_ref(rope(q.cpu(), cos.cpu(), sin.cpu()), k.cpu(), v.cpu(),
                                            m.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pos", [0, 37, 69])
@pytest.mark.parametrize("k_rope", [False, True])
def test_kernel_writes_the_new_row_then_attends(kernel_device, dtype, pos, k_rope):
    """With a cache write, the kernel stores the step's key (rotated when given tables) and
    value rows at ``pos`` (first, middle or last position; in the first, a middle or the last
    of the split runs) and attends over the updated cache: the output and the caches match
    ``index_copy_`` + attention, the rest of the caches untouched."""
    from qcompile.backends.triton.decode_attention import CacheWrite, decode_attention
    from qcompile.backends.triton.ops import rope

    device = kernel_device
    b, hq, hkv, n, d = 2, 4, 2, 70, 16
    q, k, v = _qkv(b, hq, hkv, n, d, d, dtype, device)
    gen = torch.Generator().manual_seed(5)
    k_new, v_new = (torch.randn(b, hkv, 1, d, generator=gen).to(dtype=dtype, device=device)
                    for _ in range(2))
    ang = (torch.arange(d) * 0.3).view(1, 1, 1, d)
    cos, sin = (t.to(dtype=dtype, device=device) for t in (ang.cos(), ang.sin()))
    index = torch.tensor([pos], device=device)
    m = (torch.arange(n, device=device) <= max(pos, 40)).view(1, 1, 1, n)
    tables = (cos, sin) if k_rope else (None, None)
    kr, vr = k.clone(), v.clone()
    kr.index_copy_(2, index, rope(k_new, cos, sin) if k_rope else k_new)
    vr.index_copy_(2, index, v_new)
    want = _ref32(q, kr, vr, m)
    for splits in (1, 4):
        kk, vv = k.clone(), v.clone()
        out = decode_attention(q, kk, vv, m, splits=splits,
                               write=CacheWrite(index, k_new, v_new, *tables))
        torch.testing.assert_close(out.float(), want, **_TOL[dtype])
        rest = torch.arange(n, device=device) != pos
        assert torch.equal(kk[:, :, rest], k[:, :, rest]) and torch.equal(vv, vr)
        torch.testing.assert_close(kk[:, :, pos], kr[:, :, pos], **_TOL[dtype])


def test_bad_inputs_are_named(kernel_device):
    from qcompile.backends.triton.decode_attention import decode_attention
    from qcompile.backends.triton.runtime import KernelInputError

    device = kernel_device
    q, k, v = _qkv(1, 4, 2, 9, 16, 16, torch.float32, device)
    cases = [
        ((q.expand(1, 4, 3, 16), k, v), "3 query rows"),
        ((q, k.half(), v), "dtype"),
        ((q[:, :3], k, v), "not a multiple"),
        ((q, k[..., :8], v), "head_dim"),
        ((q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.int32, device=device)), "mask"),
        ((q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.bool, device=device)), "broadcast"),
        ((q, k[:, :, :0], v[:, :, :0]), "empty cache"),
    ]
    for args, words in cases:
        with pytest.raises(KernelInputError, match=words):
            decode_attention(*args)
    with pytest.raises(KernelInputError, match="power of two"):
        decode_attention(q, k, v, splits=3)
    cos = torch.ones(1, 1, 1, 16, device=device)
    with pytest.raises(KernelInputError, match="both cos and sin"):
        decode_attention(q, k, v, cos=cos)
    with pytest.raises(KernelInputError, match="cos must be in the cache's dtype"):
        decode_attention(q, k, v, cos=cos.half(), sin=cos.half())
    with pytest.raises(KernelInputError, match="does not broadcast"):
        decode_attention(q, k, v, cos=cos[..., :8], sin=cos[..., :8])
    with pytest.raises(ValueError, match="both cos and sin"):
        Q.decode_attention(q.cpu(), k.cpu(), v.cpu(), None, None, False, cos.cpu())
    from qcompile.backends.triton.decode_attention import CacheWrite

    row = torch.zeros(1, 2, 1, 16, device=device)
    idx = torch.tensor([3], device=device)
    for write, words in ((CacheWrite(idx.float(), row, row), "index must be"),
                         (CacheWrite(idx, row[:, :1], row), "k_new must be"),
                         (CacheWrite(idx, row, row, cos), "both k_cos and k_sin")):
        with pytest.raises(KernelInputError, match=words):
            decode_attention(q, k, v, write=write)


def test_op_on_the_cpu_is_the_graphs_composition():
    """On the CPU the op is the reference composition bit for bit (``repeat_kv`` or
    ``enable_gqa`` as the graph had it)."""
    q, k, v = _qkv(1, 4, 2, 33, 16, 16, torch.float32, "cpu")
    m = _mask("prefix", 1, 4, 33, torch.float32, "cpu")
    kr = k[:, :, None].expand(1, 2, 2, 33, 16).reshape(1, 4, 33, 16)
    vr = v[:, :, None].expand(1, 2, 2, 33, 16).reshape(1, 4, 33, 16)
    graph_sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=m)
    assert torch.equal(Q.decode_attention(q, k, v, m), graph_sdpa)
    assert torch.equal(Q.decode_attention(q, k, v, m, None, True),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True))


def test_op_runs_the_kernel_where_it_fits(kernel_device):
    """Through the kernels the op matches the kernel; several query rows, which the kernel
    does not take, run the reference there too."""
    device = kernel_device
    q, k, v = _qkv(1, 4, 2, 33, 16, 16, torch.float32, "cpu")
    m = _mask("prefix", 1, 4, 33, torch.float32, "cpu")
    from qcompile.backends.triton.decode_attention import decode_attention
    from qcompile.backends.triton.ops import kernels_on_cpu

    ctx = kernels_on_cpu() if device == "cpu" else contextlib.nullcontext()
    q, k, v, m = (t.to(device) for t in (q, k, v, m))
    with ctx:
        out = Q.decode_attention(q, k, v, m, 0.5)
        rows3 = torch.randn(1, 4, 3, 16, device=device)
        several = Q.decode_attention(rows3, k, v, None, 0.5)
    torch.testing.assert_close(out, decode_attention(q, k, v, m, 0.5), atol=0, rtol=0)
    assert torch.equal(several, decode_attention_ref(rows3, k, v, None, 0.5))


def test_splits_and_configs_follow_the_gpu_and_the_cache(monkeypatch):
    """Splits fill 2x the multiprocessors, no more runs than 64-position blocks, a power of
    two up to MAX_SPLITS (32: Llama-3-8B's 8 kv heads fill 2x 132 SMs); the autotune prune keeps tiles that fit registers and blocks no longer
    than a split's share."""
    pytest.importorskip("triton")
    from qcompile.backends.triton import decode_attention as da

    monkeypatch.setattr(da, "interpreting", lambda: False)
    monkeypatch.setattr(da, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert da._splits(8, 300, cuda) == 8  # 5 blocks of 64 -> 8 runs
    assert da._splits(8, 4096, cuda) == da.MAX_SPLITS == 32
    assert da._splits(64, 4096, cuda) == 8  # ceil(264 / 64) = 5 -> 8
    assert da._splits(512, 100, cuda) == 1
    meta = dict(BLOCK_G=16, BLOCK_DK=128, BLOCK_DV=128, NSPLIT=16, PREC="tf32")
    kept = da._prune(da.CONFIGS, {"L": 1024}, **meta)
    assert {c.kwargs["BLOCK_L"] for c in kept} == {32, 64}  # share of 1024 / 16 = 64
    fp32 = da._prune(da.CONFIGS, {"L": 1 << 16}, **dict(meta, PREC="tf32x3"))
    assert fp32 and all(da._tile_cost(c, 16, 128, True) < 256 for c in fp32)
    assert len(fp32) < len(da._prune(da.CONFIGS, {"L": 1 << 16}, **meta))


# --- the rewrite -----------------------------------------------------------------------------

class _Attn(torch.nn.Module):
    def __init__(self, repeat: str = "expand", **sdpa):
        super().__init__()
        self.repeat, self.sdpa = repeat, sdpa

    def forward(self, q, k, v, mask):
        b, hkv, n, d = k.shape
        rep = q.shape[1] // hkv
        if self.repeat == "expand":  # transformers' repeat_kv
            k = k[:, :, None].expand(b, hkv, rep, n, d).reshape(b, hkv * rep, n, d)
            v = v[:, :, None].expand(b, hkv, rep, n, d).reshape(b, hkv * rep, n, d)
        elif self.repeat == "interleave":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa) * 2


class _RopeAttn(_Attn):
    """Hugging Face's ``apply_rotary_pos_emb`` on q (and k) before the attention; with
    ``leak`` the rotated q is also returned (a second reader)."""

    def __init__(self, leak: bool = False):
        super().__init__("expand")
        self.leak = leak

    def forward(self, q, k, v, mask):
        d = q.shape[-1]
        ang = torch.arange(d, dtype=q.dtype).view(1, 1, 1, d) * 0.1
        cos, sin = ang.cos(), ang.sin()

        def rot(x):
            return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

        q = (q * cos) + (rot(q) * sin)
        k = (k * cos) + (rot(k) * sin)
        out = super().forward(q, k, v, mask)
        return (out, q) if self.leak else out


def _exported(module, rows: int = 1, mask_dtype=torch.bool):
    q = torch.randn(1, 4, rows, 16)
    k, v = torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    mask = (torch.rand(1, 1, rows, 24) > 0.3) if mask_dtype == torch.bool else \
        torch.randn(1, 1, rows, 24).to(mask_dtype)
    args = (q, k, v, mask)
    gm = torch.export.export(module, args, strict=False).module()
    return gm, args


def _lowered(gm, text: str = "lower-triton"):
    gm, report = quantize_graph(gm, text, progress=False)
    return gm, report["passes"][0]


@pytest.mark.parametrize("repeat,sdpa", [("expand", {}), ("interleave", {"scale": 0.2}),
                                         ("none", {"enable_gqa": True})])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_one_row_sdpa_becomes_decode_attention(repeat, sdpa, mask_dtype):
    """The SDPA and its head repeat go; the op reads the cache as it is; same bits."""
    gm, args = _exported(_Attn(repeat, **sdpa), mask_dtype=mask_dtype)
    want = gm(*args)
    gm, res = _lowered(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert res["modified"] and res["facts"]["attention"] == 1
    assert SDPA not in targets and torch.ops.aten.expand.default not in targets
    assert torch.ops.aten.repeat_interleave.self_int not in targets
    (op,) = [n for n in gm.graph.nodes if n.target is Q.decode_attention.default]
    assert [a.op for a in op.args[1:3]] == ["placeholder", "placeholder"]  # the cache itself
    assert op.args[4] == sdpa.get("scale") and op.args[5] == ("enable_gqa" in sdpa)
    assert torch.equal(gm(*args), want)


class _AttnNoMask(_Attn):
    def forward(self, q, k, v, mask):
        return super().forward(q, k, v, None)


def test_rotary_query_folds_into_the_op():
    """q's rotary embedding, read only by the SDPA, goes into the op (cos/sin arguments): its
    products, cat, negation and slices are gone; k's (the cache's) stays; same bits. A
    rotated q read elsewhere too stays a graph value."""
    gm, args = _exported(_RopeAttn())
    want = gm(*args)
    n_neg = [n.target for n in gm.graph.nodes].count(torch.ops.aten.neg.default)
    gm, res = _lowered(gm)
    assert (res["facts"]["attention"], res["facts"]["attention_rope"]) == (1, 1)
    (op,) = [n for n in gm.graph.nodes if n.target is Q.decode_attention.default]
    assert op.args[0].op == "placeholder" and len(op.args) == 8
    assert [n.target for n in gm.graph.nodes].count(torch.ops.aten.neg.default) == n_neg - 1
    assert torch.equal(gm(*args), want)
    gm, args = _exported(_RopeAttn(leak=True))
    want = gm(*args)
    gm, res = _lowered(gm)
    assert (res["facts"]["attention"], res["facts"]["attention_rope"]) == (1, 0)
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), want, strict=True))


@pytest.mark.parametrize("sdpa,words", [({"is_causal": True}, "is_causal"),
                                        ({"dropout_p": 0.1}, "dropout")])
def test_one_row_sdpa_that_cannot_be_taken_is_reported(sdpa, words):
    """One query row with ``is_causal`` (which attends the first position only) or dropout:
    left as it is, with the reason in the report."""
    gm, _ = _exported(_AttnNoMask(**sdpa))
    gm, res = _lowered(gm)
    assert res["facts"]["attention"] == 0
    assert any(words in s["reason"] for s in res["facts"]["not_lowered"])
    assert SDPA in [n.target for n in gm.graph.nodes]


def test_several_rows_and_the_option_off_leave_the_graph():
    """A prefill SDPA (three query rows) is not a decode step: untouched and not reported;
    ``attention=false`` keeps a decode SDPA (and round-trips as text)."""
    gm, _ = _exported(_Attn(), rows=3)
    gm, res = _lowered(gm)
    assert not res["modified"] and res["facts"]["not_lowered"] == []
    gm, _ = _exported(_Attn())
    gm, res = _lowered(gm, "lower-triton{attention=false}")
    assert not res["modified"] and SDPA in [n.target for n in gm.graph.nodes]
    from qcompile.pipeline import parse_pipeline

    assert str(parse_pipeline("lower-triton{attention=false}")) == "lower-triton{attention=false}"


def _counter_graph(index_len: int = 1, bump: int = 1, other_reader: bool = False,
                   bump_first: bool = False):
    """A graph holding a cache write whose index is ``arange(index_len) + c`` for an integer
    input ``c`` that ``c.add_(bump)`` bumps after (a static-cache layer's position counter)."""
    g = torch.fx.Graph()
    c = g.placeholder("c")
    c.meta["val"] = torch.tensor(0)
    rest = [g.placeholder(n) for n in ("q", "k", "v", "kn", "vn")]
    if bump_first:  # the index then reads the bumped value
        g.call_function(torch.ops.aten.add_.Tensor, (c, bump))
    ar = g.call_function(torch.ops.aten.arange.default, (index_len,))
    idx = g.call_function(torch.ops.aten.add.Tensor, (ar, c))
    idx.meta["val"] = torch.zeros(index_len, dtype=torch.long)
    if not bump_first:
        g.call_function(torch.ops.aten.add_.Tensor, (c, bump))
    att = g.call_function(torch.ops.qcompile.decode_attention_write.default,
                          (rest[0], rest[1], rest[2], idx, rest[3], rest[4]))
    outs = [att]
    if other_reader:
        outs.append(g.call_function(torch.ops.aten.add.Tensor, (c, 5)))
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_cache_counters_are_bumped_together_at_the_end():
    """A counter read only by the write's index and bumped by one right after: the write
    reads the counter (as ``[1]``), and one ``_foreach_add_`` before the output bumps it;
    the arange, the index and the bump are gone. A counter read elsewhere, bumped by another
    amount or before the index reads it, or an index of several positions stays as it
    was."""
    from qcompile.passes.lower_triton_attention import batch_cache_counters

    gm = _counter_graph()
    assert batch_cache_counters(gm) == 1
    gm.graph.lint()
    nodes = list(gm.graph.nodes)
    targets = [n.target for n in nodes]
    assert torch.ops.aten.add_.Tensor not in targets
    assert torch.ops.aten.arange.default not in targets
    att = next(n for n in nodes if n.target is torch.ops.qcompile.decode_attention_write.default)
    index = att.args[3]
    assert index.target is torch.ops.aten.view.default and index.args == (nodes[0], [1])
    bump = nodes[-2]
    assert bump.target is torch.ops.aten._foreach_add_.Scalar and bump.args == ([nodes[0]], 1)
    for kw in (dict(other_reader=True), dict(bump=2), dict(index_len=2),
               dict(bump_first=True)):
        gm = _counter_graph(**kw)
        before = [n.target for n in gm.graph.nodes]
        assert batch_cache_counters(gm) == 0, kw
        assert [n.target for n in gm.graph.nodes] == before


# --- end to end: the torch.compile backend ---------------------------------------------------

def _generate(lower: str, inductor: bool = False) -> tuple[torch.Tensor, list]:
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    qcompile.compile(model, pipeline="quantize{w=fp4_e2m1/g32/asym},cleanup", lower=lower,
                     inductor=inductor)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False,
                             cache_implementation="static")
    facts = [p["facts"] for r in model.qcompile_backend.stats.reports for p in r["passes"]
             if p["name"] == "lower-triton"]
    torch._dynamo.reset()
    return out, facts


def _steps(lower: str, inductor: bool = False):
    """Prefill 5 tokens and decode 4 greedily over a StaticCache we hold: the logits, the
    caches and their layers' position counters after, and lower-triton's facts per graph."""
    from transformers import StaticCache

    torch._dynamo.reset()
    model = tiny_model("llama")
    qcompile.compile(model, pipeline="quantize{w=fp4_e2m1/g32/asym},cleanup", lower=lower,
                     inductor=inductor)
    cache = StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = [model(ids, past_key_values=cache, cache_position=torch.arange(5),
                        use_cache=True).logits]
        for p in range(5, 9):
            tok = logits[-1][:, -1:].argmax(-1)
            logits.append(model(tok, past_key_values=cache, cache_position=torch.tensor([p]),
                                use_cache=True).logits)
    kv = [t.clone() for layer in cache.layers
          for t in (layer.keys, layer.values, layer.cumulative_length)]
    facts = [p["facts"] for r in model.qcompile_backend.stats.reports for p in r["passes"]
             if p["name"] == "lower-triton"]
    torch._dynamo.reset()
    return logits, kv, facts


@pytest.mark.parametrize("inductor", [False, True], ids=["eager", "inductor"])
def test_decode_steps_write_the_cache_in_the_attention_op(inductor):
    """Lowered, each decode graph's attentions become ``decode_attention_write`` (the rotary
    embeddings of q and k and both cache writes folded in); the logits of every step and the
    caches after them are those of the unlowered graphs: bit for bit eagerly, within fp32
    rounding under Inductor (which fuses the unlowered graph's element-wise ops). The
    second layer's position counter is bumped with the others at the graph's end (the first
    layer's also gives the positions and the mask, so it stays), and every counter ends
    where the unlowered run leaves it (9)."""
    want, kv_want, _ = _steps("none", inductor)
    got, kv_got, facts = _steps("always", inductor)
    decode = [f for f in facts if f["attention"]]
    assert decode and all(f["attention_write"] == f["attention_rope"] == 2 for f in decode)
    assert all(f["attention_counters"] == 1 for f in decode)
    assert [int(t) for t in kv_got[2::3]] == [9, 9]
    for a, b in zip(got + kv_got, want + kv_want, strict=True):
        if inductor:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b)


def test_static_cache_generate_lowers_decode_attention():
    """Greedy static-cache decoding through the backend: the decode graph's attentions (2
    layers) become ``decode_attention``, the prefill's stay, and the tokens are the unlowered
    run's."""
    want, _ = _generate("none")
    got, facts = _generate("always")
    assert torch.equal(got, want)
    assert sorted(f["attention"] for f in facts) == [0, 2]
    assert sorted(f["attention_rope"] for f in facts) == [0, 2]


def test_benchmark_times_the_three_ways_or_refuses_without_cuda():
    """``benchmarks/kernels_attention.py``: on a GPU every case has the graph's ways, PyTorch's
    GQA SDPA and the kernels, each close to the fp32 reference; without one it refuses."""
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import kernels_attention

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            kernels_attention.run()
        return
    rows = kernels_attention.run()
    ways = {"graph", "sdpa_gqa", "decode_attention", "graph_step", "decode_attention_write"}
    assert len(rows) == len(ways) * len(kernels_attention.CASES)
    assert {r["way"] for r in rows} == ways
    assert all(r["max_abs_err"] < 3e-2 and r["us"] > 0 for r in rows)


def test_split_count_is_timed_per_shape(monkeypatch, kernel_device):
    """With timing possible, each shape's first call times the default run count, one run and
    a quarter of the default, keeps the fastest under the shape's key, and gives the
    reference's result whichever it keeps."""
    pytest.importorskip("triton")
    from qcompile.backends.triton import decode_attention as da
    from qcompile.backends.triton import path_tuning

    timed: list[str] = []

    def fake_time(fn, cold=False):
        timed.append(fn.args[0])
        fn()
        return {"8": 3.0, "1": 2.0, "2": 1.0}[fn.args[0]]

    path_tuning.clear()
    monkeypatch.setattr(path_tuning, "ENABLED", True)
    monkeypatch.setattr(path_tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(path_tuning, "_time_ms", fake_time)
    monkeypatch.setattr(da, "_splits", lambda programs, length, device: 8)
    q, k, v = _qkv(1, 4, 2, 300, 16, 16, torch.float32, kernel_device)
    out = da.decode_attention(q, k, v)
    torch.testing.assert_close(out, _ref32(q, k, v, None, None), **_TOL[torch.float32])
    assert sorted(timed) == ["1", "2", "8"]
    assert [c for key, c in path_tuning.choices().items() if key[0] == "decode-attention"] == ["2"]
    da.decode_attention(q, k, v)  # the choice is kept: nothing timed again
    assert len(timed) == 3
    path_tuning.clear()


def test_a_growing_cache_is_timed_once_per_length_bucket(monkeypatch):
    """A dynamic cache grows by one position per decode step: the run count is timed once for
    each power-of-two count of 64-position blocks, not at every new length (which would time
    the candidates at every step on a GPU)."""
    pytest.importorskip("triton")
    from qcompile.backends.triton import decode_attention as da
    from qcompile.backends.triton import path_tuning

    picks: list[tuple] = []

    def fake_pick(key, default, paths, run, device, cold=False):
        picks.append(key)
        return path_tuning._CHOICES.setdefault(key, default)

    path_tuning.clear()
    monkeypatch.setattr(path_tuning, "pick", fake_pick)
    q = torch.zeros(1, 4, 1, 16)
    for length in (257, 300, 301, 512, 513, 1024, 1025):
        kv = torch.zeros(1, 2, length, 16)
        assert da._tuned_splits(q, kv, kv, None, 1.0, None, None, None, 8) == 8
    buckets = [key[6] for key in picks]
    assert buckets == [8, 16, 32], picks
    path_tuning.clear()
