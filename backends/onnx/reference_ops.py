"""``onnx.reference`` implementations of the ``com.microsoft`` ops qcompile emits.

``onnx.reference`` knows only standard ops (and model-local functions). This module adds a
numpy ``MatMulNBits`` following ONNX Runtime's contrib-op specification (4-bit ``B``
``[N, blocks, block_size / 2]``, two codes per byte with the first in the low nibble, fp32
``scales [N * blocks]``, packed 4-bit ``zero_points`` (default 8); 8-bit ``B``
``[N, blocks, block_size]`` with one uint8 zero point per block (default 128); ``K`` may end
inside the last block). It computes in fp32 whatever ``accuracy_level`` says, so it is the exact
function ORT approximates at accuracy level 4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

__all__ = ["MatMulNBits", "matmul_nbits", "reference_evaluator"]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def matmul_nbits(a: np.ndarray, b: np.ndarray, scales: np.ndarray,
                 zero_points: np.ndarray | None, k: int, block_size: int,
                 bits: int = 4) -> np.ndarray:
    """``a @ dequant(b)^T`` in fp32 for 4- or 8-bit blocked ``b`` (MatMulNBits, no bias)."""
    n, blocks = b.shape[0], b.shape[1]
    if bits == 8:
        codes = b.reshape(n, blocks, block_size).astype(np.float32)
        zero = (np.full((n, blocks), 128.0, dtype=np.float32) if zero_points is None
                else zero_points.reshape(n, blocks).astype(np.float32))
    else:
        codes = _nibbles(b.reshape(n, -1)).astype(np.float32).reshape(n, blocks, block_size)
        zero = (np.full((n, blocks), 8.0, dtype=np.float32) if zero_points is None
                else _nibbles(zero_points.reshape(n, -1))[:, :blocks].astype(np.float32))
    s = scales.reshape(n, blocks).astype(np.float32)
    w = ((codes - zero[..., None]) * s[..., None]).reshape(n, -1)[:, :k]
    return a.astype(np.float32) @ w.T


class MatMulNBits(OpRun):
    """``Y = A @ dequant(B)^T (+ bias)`` for 4- or 8-bit blocked ``B``."""

    op_domain = "com.microsoft"

    def _run(self, a: np.ndarray, b: np.ndarray, scales: np.ndarray,
             zero_points: np.ndarray | None = None, g_idx: Any = None, bias: Any = None,
             K: int | None = None, N: int | None = None, bits: int | None = None,  # noqa: N803
             block_size: int | None = None, accuracy_level: int | None = None,
             **_: Any) -> tuple[np.ndarray]:
        if bits not in (4, 8) or g_idx is not None:
            raise NotImplementedError("reference MatMulNBits handles bits 4 and 8 without g_idx")
        y = matmul_nbits(a, b, scales, zero_points, int(K), int(block_size), int(bits))
        if bias is not None:
            y = y + bias
        return (y.astype(a.dtype),)


def reference_evaluator(model: onnx.ModelProto | str) -> ReferenceEvaluator:
    """An ``onnx.reference`` evaluator that also runs the ``com.microsoft`` ops above."""
    return ReferenceEvaluator(model, new_ops=[MatMulNBits])
