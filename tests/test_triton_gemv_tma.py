"""The persistent TMA batch-1 FP4 GEMV (:mod:`qcompile.backends.triton.w4a16_gemv_tma`).

Most configs take the FMA word kernel's decode and products, so their result must be the FMA
kernel's result bit for bit at the same K split (the same tile of K per step, the same
summation order); the ``-mma`` configs take the tensor-core kernel's, so theirs must be that
kernel's at the same tile and split (bit for bit in the interpreter; on a GPU within an output
ulp, as the tensor cores' internal order is not promised to be the same in two kernels).
Those kernels' results are checked against the PyTorch reference in ``test_triton_w4a16.py``
and ``test_triton_w4a16_mma.py``; here also directly against the reference, and with the
decode fusions against the unfused ops. Under the interpreter (CPU) one small config of each
kind runs, about three units per program, unsplit and split in two over K; on CUDA (sm_90+)
every config runs, with a weight of more row blocks than program slots among the shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import path_tuning  # noqa: E402
from qcompile.backends.triton import w4a16 as w4  # noqa: E402
from qcompile.backends.triton import w4a16_gemv as g1  # noqa: E402
from qcompile.backends.triton import w4a16_gemv_mma as mm  # noqa: E402
from qcompile.backends.triton import w4a16_gemv_tma as tma  # noqa: E402
from qcompile.backends.triton.gemv_fusion import GemvFusion, epilogue_ref, prologue_ref  # noqa: E402
from qcompile.formats import pack_codes, parse_format, quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if CUDA and torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("TMA needs sm_90 or newer", allow_module_level=True)


def _weight(fmt: str, n: int, k: int, seed: int = 0):
    """(words, packed, scale, scale_neg, outer, group_size) of a random [n, k] FP4 weight."""
    spec = parse_format(fmt)
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), spec)
    packed = pack_codes(q.codes, 4).to(DEV)
    gs = spec.group_size if spec.granularity == "group" else k
    rest = [None if t is None else t.to(DEV) for t in (q.scale, q.scale_neg, q.outer)]
    return (g1._words(packed, k), packed, *rest, gs)


def _x(k: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return (torch.randn(1, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype).to(DEV)


def _fma(x, w, bias=None, split=1, **kw):
    """The FMA word kernel at the same K split: the bits the TMA kernel must give."""
    words, packed, scale, neg, outer, gs = w
    table = w4.element_table("fp4_e2m1", DEV)
    return g1.w4a16_gemv1(x, packed, table, scale, neg, None, outer, gs, bias, True,
                          split=split, kernel="fma", **kw)


def _tile(cfg: str) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of a config name."""
    cfg = cfg.removesuffix("-mma")
    return (int(cfg[1:].split("k")[0]), int(cfg.split("k")[1].split("s")[0]),
            int(cfg.split("w")[1]))


def _twin(cfg: str, x, w, bias=None, split=1, **kw):
    """What config ``cfg`` must give: the FMA kernel's result for FMA configs, the
    tensor-core kernel's at the same tile (BLOCK_N, BLOCK_K, warps) for ``-mma`` ones."""
    if not cfg.endswith("-mma"):
        return _fma(x, w, bias, split, **kw)
    import triton

    words, _, scale, neg, outer, gs = w
    bn, bk, warps = _tile(cfg)
    pinned = None if not CUDA else triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PIPE": 1},
                                                 num_warps=warps)
    return mm.w4a16_gemv1_mma(x, words, scale, neg, outer, gs, bias, split=split,
                              config=pinned, **kw)


def _same(got, want, cfg: str) -> bool:
    """Bit-equal, or for an ``-mma`` config on a GPU within an output ulp (module
    docstring)."""
    if not (CUDA and cfg.endswith("-mma")):
        return torch.equal(got, want)
    tol = 2**-7 if got.dtype in (torch.bfloat16, torch.float16) else 1e-5
    return got.dtype == want.dtype and torch.allclose(
        got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


def _splits(k: int, cfg: str) -> list[int]:
    """The K splits to check for a config: 1, and 2 where it divides the K tiles."""
    bk = _tile(cfg)[1]
    return [1, 2] if -(-k // bk) % 2 == 0 else [1]


def _configs(gs: int, dtype: torch.dtype, every: bool = False) -> list[str]:
    """The configs that take this group size and x dtype to check: on a GPU the first of each
    kind, or all of them with ``every`` (each compiles per format: the GPU run's time); the
    interpreter has one of each kind."""
    names = list(tma.config_names(gs, dtype in mm.X_DTYPES))
    if every or not CUDA:
        return names
    fma = [c for c in names if not c.endswith("-mma")][:1]
    return fma + [c for c in names if c.endswith("-mma")][:1]


# N: one row, fewer rows than a block, several blocks per program with a ragged last one.
@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128", "fp4_e2m1/g128/asym", "fp4_e2m1/g32/m2",
                                 "fp4_e2m1/g64/po2"])
@pytest.mark.parametrize("n,k", [(1, 256), (7, 512), (33, 1024), (100, 768)]
                         + ([(20000, 512)] if CUDA else []))  # GPU: more blocks than slots
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_fma_kernel_and_reference(fmt, n, k, dtype):
    """The result of the kernel whose products a config takes (the FMA kernel's, bit for bit;
    the tensor-core kernel's for ``-mma`` configs, see :func:`_same`) at the same K split
    (with a bias; unsplit, and split in two summed in place), and within the FMA kernel's
    tolerance of the reference: the weight unrounded, fp32 sums."""
    w = _weight(fmt, n, k)
    x = _x(k, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    assert tma.tma_eligible(x, w[0], w[5])
    # The weight is not rounded to x's dtype before the multiply: an output ulp or so.
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    want = _fma(x, w, bias)
    ref = w4.w4a16_linear_ref(x, w[1], w4.element_table("fp4_e2m1", DEV), w[2], w[3], None,
                              w[4], w[5], bias=bias)
    # On a GPU every config for the common formats, the first of each kind for the others.
    configs = _configs(w[5], dtype, every=fmt in ("fp4_e2m1/g128", "fp4_e2m1/g128/asym")
                       and n == 20000)
    # Tensor-core configs: 16-bit x, tiles inside a group (on the GPU's list 64 or 128 wide).
    assert any(c.endswith("-mma") for c in configs) == (
        dtype != torch.float32 and (not CUDA or w[5] % 64 == 0))
    for cfg in configs:
        for split in _splits(k, cfg):
            got = tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], bias, config=cfg,
                                      split=split)
            assert got.shape == (1, n) and got.dtype == dtype
            assert _same(got, _twin(cfg, x, w, bias, split), cfg), (cfg, split)
            assert torch.allclose(got.float(), ref.float(), rtol=tol,
                                  atol=tol * ref.abs().max().item()), (cfg, split)
    assert torch.allclose(want.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("fusion_name", ["rms", "gate+res", "res"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_fusions_match_the_fma_kernels(fusion_name, dtype):
    """RMSNorm / SiLU-gate prologue and residual epilogue: the FMA kernel's bits, and those
    are the unfused ops' here (interpreter: the same exp and mean as PyTorch's CPU ops)."""
    n, k = 45, 512
    w = _weight("fp4_e2m1/g128", n, k)
    x = _x(k, dtype)
    gen = torch.Generator().manual_seed(7)
    g, up, res = (torch.randn(*s, generator=gen).to(dtype).to(DEV) for s in ((k,), (1, k),
                                                                            (1, n)))
    fusion = {"rms": GemvFusion(g, 1e-6), "gate+res": GemvFusion(up=up, residual=res),
              "res": GemvFusion(residual=res)}[fusion_name]
    want = _fma(x, w, fusion=fusion)
    for cfg in _configs(w[5], dtype):
        for split in _splits(k, cfg):
            got = tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None, fusion=fusion,
                                      config=cfg, split=split)
            assert _same(got, _twin(cfg, x, w, split=split, fusion=fusion), cfg), (cfg, split)
    if not CUDA:
        plain = epilogue_ref(_fma(prologue_ref(x, fusion), w), fusion)
        assert torch.equal(want, plain)


def test_fp8_codes_with_x_scale_and_fp32_output():
    """W4A8 decoding: FP8 E4M3 activation codes, their scale after the sums, fp32 out."""
    n, k = 21, 256
    w = _weight("fp4_e2m1/g32/m2", n, k)
    x = _x(k, torch.float32).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.tensor([0.37], device=DEV)
    configs = _configs(w[5], x.dtype)
    assert any(c.endswith("-mma") for c in configs)
    for cfg in configs:
        for split in _splits(k, cfg):
            got = tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None, x_scale=xs,
                                      out_dtype=torch.float32, config=cfg, split=split)
            want = _twin(cfg, x, w, split=split, x_scale=xs, out_dtype=torch.float32)
            assert got.dtype == torch.float32 and _same(got, want, cfg), (cfg, split)


def test_eligibility_names_what_it_needs():
    """K not a multiple of 32 (rows not 16-byte aligned), a misaligned base, words that are
    not contiguous, two rows, or a group no config fits: not eligible; an unknown config, a
    tensor-core config for fp32 x, or a split that does not divide the K tiles: an error
    naming the valid ones."""
    w = _weight("fp4_e2m1/g128", 8, 512)
    x = _x(512, torch.bfloat16)
    assert tma.tma_eligible(x, w[0], 128)
    assert not tma.tma_eligible(torch.cat([x, x]), w[0], 128)
    odd = _weight("fp4_e2m1/g8", 8, 520)  # 65 words per row: 260 bytes
    assert odd[0] is not None and not tma.tma_eligible(_x(520, torch.bfloat16), odd[0], 8)
    shifted = torch.zeros(8 * 128 + 1, dtype=torch.int32, device=DEV)[1:].view(8, 128)
    assert not tma.tma_eligible(x, shifted, 128)
    assert not tma.tma_eligible(x, w[0], 24)  # neither spans nor divides a tile
    wide = torch.zeros(8, 256, dtype=torch.int32, device=DEV)[:, :128]  # rows 1 KiB apart
    assert not tma.tma_eligible(x, wide, 128)
    with pytest.raises(ValueError, match="config must be one of"):
        tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None, config="n1k1s1p1w1")
    with pytest.raises(ValueError, match="split must divide the"):
        tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None, split=3)
    # fp32 x does not convert to fp16 exactly: no tensor-core config takes it.
    mma = next(c for c in tma.config_names(128) if c.endswith("-mma"))
    assert mma not in tma.config_names(128, mma_ok=False)
    with pytest.raises(ValueError, match="config must be one of"):
        tma.w4a16_gemv1_tma(x.float(), w[0], w[2], w[3], w[4], w[5], None, config=mma)


def test_split_takes_the_fewest_that_fill_the_slots():
    """Short weights get K splits until every program slot has a unit; splits divide the
    tiles; a weight with enough row blocks stays unsplit."""
    assert tma._split(blocks=896, tiles=4, slots=396) == 1
    assert tma._split(blocks=128, tiles=4, slots=396) == 4
    assert tma._split(blocks=192, tiles=4, slots=396) == 4
    assert tma._split(blocks=256, tiles=14, slots=528) == 2
    assert tma._split(blocks=8, tiles=3, slots=528) == 1
    assert tma._split(blocks=8, tiles=16, slots=528) == 8


def test_configs_are_timed_once_per_shape(monkeypatch):
    """Where timing is possible, each config runs once for its timing at the first call of a
    shape and the fastest is kept under the shape's key; every candidate's result is a new
    tensor (compared with the default's, not the same memory). Three small configs (two FMA,
    one tensor-core, the fastest) stand in for the GPU's list on the CPU."""
    if not CUDA:
        two = ((16, 256, 2, 1, 4, False), (32, 128, 2, 2, 4, False), (16, 32, 2, 1, 4, True))
        monkeypatch.setattr(tma, "_configs", lambda gs, interp, mma_ok=True: two)
    names = tma.config_names(128)
    assert len(names) >= 2
    times = {name: 1.0 + i for i, name in enumerate(names)}
    times[names[-1]] = 0.5
    monkeypatch.setattr(path_tuning, "ENABLED", True)
    monkeypatch.setattr(path_tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(path_tuning, "_time_ms", lambda call, cold=False: times[call.args[0]])
    outs = []
    real = path_tuning.agrees
    monkeypatch.setattr(path_tuning, "agrees",
                        lambda out, want: outs.append((out, want)) or real(out, want))
    warmed = []
    monkeypatch.setattr(tma, "warm_all", lambda kernel, calls: warmed.append(calls) or 0)
    path_tuning.clear()
    w = _weight("fp4_e2m1/g128", 40, 512)
    x = _x(512, torch.bfloat16)
    got = tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None)
    key = next(k for k in path_tuning.choices() if k[0] == "w4a16-gemv1-tma")
    best = min(times, key=times.__getitem__)
    assert path_tuning.choice(key) == best and best.endswith("-mma")
    assert _same(got, _twin(best, x, w), best)
    # Before the timing, every candidate went to the compile pool once, as it launches.
    assert len(warmed) == 1 and len(warmed[0]) == len(names)
    configs = tma._configs(128, tma.interpreting(), True)
    for cfg, (grid, args, kwargs) in zip(configs, warmed[0], strict=True):
        assert (kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["STAGES"], kwargs["num_warps"],
                kwargs["MMA"]) == (cfg[0], cfg[1], cfg[2], cfg[4], cfg[5])
        assert len(grid) == 1 and args[0] is x
    tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None)
    assert len(warmed) == 1  # the shape is timed: nothing compiles ahead again
    assert len(outs) == len(names) - 1 and all(o is not w_ for o, w_ in outs)
    path_tuning.clear()


def test_gemv1_routes_to_tma_when_asked(monkeypatch):
    """``w4a16_gemv1(kernel="tma")`` and ``runtime.GEMV1_MMA == "tma"`` run this kernel
    (spied) for eligible FP4 words; ineligible calls stay on the FMA kernel."""
    from qcompile.backends.triton import runtime

    calls = []
    real = tma.w4a16_gemv1_tma
    monkeypatch.setattr(tma, "w4a16_gemv1_tma", lambda *a, **kw: calls.append(1) or real(*a,
                                                                                      **kw))
    w = _weight("fp4_e2m1/g128/asym", 24, 512)
    x = _x(512, torch.bfloat16)
    table = w4.element_table("fp4_e2m1", DEV)
    args = (x, w[1], table, w[2], w[3], None, w[4], w[5], None, True)
    want = _fma(x, w)
    assert torch.equal(g1.w4a16_gemv1(*args, kernel="tma"), want) and calls == [1]
    monkeypatch.setattr(runtime, "GEMV1_MMA", "tma")
    assert torch.equal(g1.w4a16_gemv1(*args), want) and calls == [1, 1]
    odd = _weight("fp4_e2m1/g8", 8, 520)
    xo = _x(520, torch.bfloat16)
    g1.w4a16_gemv1(xo, odd[1], table, odd[2], odd[3], None, odd[4], 8, None, True)
    assert calls == [1, 1]


def test_resident_programs_counts_registers_shared_memory_and_threads():
    """Programs per multiprocessor: the tightest of registers (a warp's allocation rounded up
    to 256), shared memory (plus the 1 KiB the system keeps per block), threads and blocks."""
    sm90 = dict(tma._SM_LIMITS)
    # 117 registers: 3840 per warp, 15360 per 4-warp program -> 4; 63000 B -> 3 by shared.
    assert tma.resident_programs(117, 63000, 4, sm90) == 3
    # AFPQ's 190 registers: 6144 per warp, 24576 per program -> 2.
    assert tma.resident_programs(190, 20000, 4, sm90) == 2
    assert tma.resident_programs(32, 0, 32, sm90) == 2  # 1024 threads: by threads
    assert tma.resident_programs(8, 0, 1, sm90) == 32  # by blocks
    assert tma.resident_programs(255, 200000, 8, sm90) == 1  # never below one


def test_grid_is_capped_at_the_resident_programs_without_changing_bits(monkeypatch):
    """The first launch of a variant uses the config's programs per SM and learns from the
    compiled kernel how many fit; later launches use no more than that. The K split stays the
    config's, so the bits are the same from the first call on."""
    from types import SimpleNamespace

    grids = []
    real = tma.launch

    def spy(kernel, grid, *args, **kwargs):
        grids.append(grid[0])
        real(kernel, grid, *args, **kwargs)
        # What a compiled kernel says: 190 registers (two 4-warp programs per SM).
        return SimpleNamespace(n_regs=190, metadata=SimpleNamespace(shared=30000))

    monkeypatch.setattr(tma, "launch", spy)
    monkeypatch.setattr(tma, "interpreting", lambda: False)
    monkeypatch.setattr(tma, "sm_count", lambda device: 2)
    monkeypatch.setattr(tma, "_sm_limits", lambda device: dict(tma._SM_LIMITS))
    monkeypatch.setattr(tma, "_RESIDENT", {})
    cfg = (16, 64, 2, 4, 4, False)  # 4 programs per SM asked for, 2 fit
    monkeypatch.setattr(tma, "_configs", lambda gs, interp, mma_ok=True: (cfg,))
    w = _weight("fp4_e2m1/g64", 200, 512)  # 13 row blocks x 8 K tiles
    x = _x(512, torch.bfloat16)
    name = tma._name(cfg)
    first = tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None, config=name)
    second = tma.w4a16_gemv1_tma(x, w[0], w[2], w[3], w[4], w[5], None, config=name)
    # 13 blocks on 4 x 2 slots: unsplit; 13 units, 8 programs, then 2 x 2 = 4.
    assert grids == [8, 4]
    assert torch.equal(first, second)
    # (EXACT is off with ``interpreting`` patched: within the kernels' usual ulp.)
    want = _fma(x, w, split=1).float()
    assert torch.allclose(first.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
