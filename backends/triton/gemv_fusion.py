"""What a decode step does around a batch-1 W4A16 linear, done inside its GEMV.

In a Llama-style layer at batch 1 every quantized linear sits between small element-wise
kernels: the residual add after ``o_proj`` and ``down_proj``, the RMSNorm before ``qkv`` and
``gate_up``, ``silu(gate) * up`` before ``down_proj``. On an H100 each is a 2-3 us launch that
moves a few kilobytes (``benchmarks/results/gpu_h100_2026-11-27b.md``: about a quarter of a
decoded layer's time outside the GEMVs). A GEMV already reads its whole input row and writes
its whole output row, so it can do them on the way:

* **RMSNorm prologue** (``rms_eps >= 0``): every program first sums ``x^2`` over the row (a
  fixed order, so every program gets the same ``r``; the row comes from L2), then feeds the
  products ``round(round(x * r) * gamma)``, rounding to ``x``'s dtype as
  :func:`qcompile.backends.triton.ops.rms_norm` (HF Llama's RMSNorm) does.
* **SiLU-gate prologue** (``up`` given): the products take ``round(round(silu(x)) * up)``,
  ``silu(x) = x / (1 + exp(-x))`` in fp32 (PyTorch's formula; on the GPU ``exp`` and the
  division are the fast approximate ones, within two fp32 ulps, which the rounding to 16 bits
  almost always absorbs; the IEEE division spilled registers in the widest AFPQ tile), rounded
  as the two eager ops round.
* **Residual epilogue** (``residual`` given): ``y = round(round(acc) + residual)``, the bits of
  ``residual + linear(...)`` in ``x``'s dtype.

Cost. Every program of the GEMV puts its own copy of the input through the prologue, so the
work grows with the programs (up to 1792 for a 28672-row ``gate_up``): the FP4 word kernel runs
a prologue only in its staged tiles (``STAGE``: each element once per program, then split by
nibble), where the offline SASS census (``benchmarks/results/sass_census_sm90_2026-11-27c.json``)
counts 1.5-6 % more loop instructions for the RMSNorm and 4-15 % for the SiLU gate (the
tensor-core GEMV: 1-4 % and 4-7 %). The residual add costs one load per output. Whether that beats
the launches saved is for the device (``benchmarks/decode.py``, variant ``w4a16-fp4-nodf``).

Numerics against the unfused ops: the residual add is exact; the prologues match up to
``exp`` (approximate on the GPU) and the fp32 rounding of the row's mean square (another
summation order), i.e. an input element occasionally one ulp of its dtype away. On the CPU the
op runs the plain composition (:func:`prologue_ref`, :func:`epilogue_ref`), the unfused bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.ops import linear_input, with_residual
from qcompile.backends.triton.runtime import KernelInputError
from qcompile.backends.triton.w4a16 import _round_to

__all__ = ["GemvFusion", "epilogue_ref", "fusion_args", "prologue_ref"]

#: Elements of ``x`` each program reads per step of the mean-square pre-pass (unrolled by 4,
#: so up to 8192 elements are in flight at once: one L2 round trip for a 4096-wide row, not
#: one per step).
RSTD_BLOCK = tl.constexpr(2048)


@dataclass(frozen=True)
class GemvFusion:
    """Work fused into a batch-1 W4A16 GEMV (module docstring); at most one prologue.

    Attributes:
        rms_weight: RMSNorm gamma ``[K]`` in ``x``'s dtype, or None (a norm without gamma).
        rms_eps: The RMSNorm epsilon; negative: no RMSNorm.
        up: ``[..., K]`` like ``x``: the input is ``silu(x) * up``; None: no gate.
        residual: ``[..., N]`` in ``x``'s dtype added to the result; None: no add.
    """

    rms_weight: torch.Tensor | None = None
    rms_eps: float = -1.0
    up: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    @property
    def prologue(self) -> int:
        """0: none, 1: RMSNorm, 2: SiLU gate (the kernels' ``PRO``)."""
        return 1 if self.rms_eps >= 0 else 2 if self.up is not None else 0

    @property
    def empty(self) -> bool:
        """Nothing to fuse (and nothing to check)."""
        return (self.rms_weight is None and self.rms_eps < 0 and self.up is None
                and self.residual is None)

    def check(self, x: torch.Tensor, n: int) -> None:
        """Raise :class:`KernelInputError` naming what does not fit ``x [..., K]`` and ``N``."""
        k = x.shape[-1]
        if self.rms_eps >= 0 and self.up is not None:
            raise KernelInputError("a fused GEMV takes an RMSNorm or a SiLU gate, not both")
        if self.rms_weight is not None and self.rms_eps < 0:
            raise KernelInputError("rms_weight given without an RMSNorm (rms_eps < 0)")
        for name, t, shape in (("rms_weight", self.rms_weight, (k,)),
                               ("up", self.up, tuple(x.shape)),
                               ("residual", self.residual, (*x.shape[:-1], n))):
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise KernelInputError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
            if t.dtype != x.dtype:
                raise KernelInputError(f"{name} is {t.dtype}; the fused GEMV needs x's "
                                       f"dtype {x.dtype}")
            if t.device != x.device:
                raise KernelInputError(f"{name} is on {t.device}, x on {x.device}")


def prologue_ref(x: torch.Tensor, fusion: GemvFusion | None) -> torch.Tensor:
    """The linear's input as the unfused ops compute it."""
    if fusion is None:
        return x
    return linear_input(x, 0, fusion.rms_weight, fusion.rms_eps, fusion.up)


def epilogue_ref(y: torch.Tensor, fusion: GemvFusion | None) -> torch.Tensor:
    """The linear's result after the fused residual add (``residual + y``)."""
    return y if fusion is None else with_residual(y, fusion.residual)


def fusion_args(fusion: GemvFusion | None, rows: int,
                placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """``((g, up, res, eps), flags)``: the kernels' fusion arguments for a launch over
    ``rows`` flattened input rows (1: a GEMV), placeholders where unused."""
    if fusion is None:
        return (placeholder, placeholder, placeholder, 0.0), dict(PRO=0, HAS_G=False,
                                                                   HAS_RES=False)
    g = fusion.rms_weight
    up = None if fusion.up is None else fusion.up.reshape(rows, -1).contiguous()
    res = None if fusion.residual is None else fusion.residual.reshape(rows, -1).contiguous()
    args = (placeholder if g is None else g.contiguous(), placeholder if up is None else up,
            placeholder if res is None else res, float(max(fusion.rms_eps, 0.0)))
    return args, dict(PRO=fusion.prologue, HAS_G=g is not None, HAS_RES=res is not None)


@triton.jit
def row_rstd(x_ptr, K, eps, PRO: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of the row at ``x_ptr`` (RMSNorm prologue; 1 without).

    Every program sums in the same order, so all of them use the same ``r``."""
    r = 1.0
    if PRO == 1:
        acc = tl.zeros([RSTD_BLOCK], dtype=tl.float32)
        for k0 in tl.range(0, K, RSTD_BLOCK, loop_unroll_factor=4):
            offs = k0 + tl.arange(0, RSTD_BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            acc += v * v
        kf = (K + tl.zeros([], dtype=tl.int32)).to(tl.float32)  # K may be a constexpr
        ms = tl.div_rn(tl.sum(acc, axis=0), kf)
        r = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
    return r


@triton.jit
def load_x(x_ptr, up_ptr, g_ptr, offs, mask, r, PRO: tl.constexpr, HAS_G: tl.constexpr,
           KIND: tl.constexpr, EXACT: tl.constexpr):
    """fp32 input elements at ``offs`` after the prologue (0 where masked off: padding adds
    nothing, since ``silu(0) = 0`` and ``0 * r = 0``). ``KIND``: ``x``'s dtype."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRO == 1:
        v = _round_to(v * r, KIND, EXACT)
        if HAS_G:
            v = _round_to(v * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                          KIND, EXACT)
    elif PRO == 2:
        v = _round_to(v / (1.0 + tl.exp(-v)), KIND, EXACT)
        v = _round_to(v * tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                      KIND, EXACT)
    return v


@triton.jit
def add_residual(y, res_ptr, offs, mask, HAS_RES: tl.constexpr, KIND: tl.constexpr,
                 EXACT: tl.constexpr):
    """``round(y + residual)`` for ``y`` already rounded to ``KIND`` (the eager add's bits)."""
    if HAS_RES:
        y = _round_to(y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                      KIND, EXACT)
    return y
