"""Fixes of older Triton interpreters that the CPU tests need (a test-harness concern: GPU runs
never use the interpreter).

* Triton < 3.7 turns a scalar into a Python int with ``int()`` of a one-element 1-D array,
  which NumPy >= 2.4 refuses: every kernel whose ``range`` bound comes from ``tl.program_id``
  or ``tl.num_programs`` fails. 3.7 squeezes the array first.
* Triton < 3.9 runs ``tl.fma`` as a multiply and an add, rounded twice. The kernels' exact
  divisions (a product plus an fma correction) then miss by an ulp near rounding ties, and the
  bit-exact tests fail on values the GPU gets right. 3.9 rounds once, as the hardware does.
"""

from __future__ import annotations

import numpy as np


def fma_rounded_once(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``x * y + z`` with one rounding to the inputs' dtype (float32 or float16; any other
    dtype is returned as numpy computes it).

    The product of two values of at most 24 significant bits is exact in float64. The sum is
    rounded to odd in float64 (the exact error from TwoSum sets the last bit), and 53 bits
    rounded to odd, then to nearest at 24 or fewer bits, is the exact sum rounded once.
    """
    x, y, z = np.broadcast_arrays(x, y, z)
    dtype = np.result_type(x, y, z)
    if dtype not in (np.float32, np.float16):
        return x * y + z
    p = x.astype(np.float64) * y.astype(np.float64)
    c = z.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c
        b = s - p
        err = (p - (s - b)) + (c - b)  # s + err == p + c exactly (finite s)
    bits = s.view(np.int64)
    inexact = (err != 0) & np.isfinite(s)
    # The truncation of the exact sum toward zero, with its last bit set: s itself when the
    # error points away from zero, else s one step nearer zero (unless that step is odd).
    away = np.signbit(err) == np.signbit(s)
    odd = np.where(away, bits | 1, np.where(bits & 1 == 1, bits, bits - 1))
    s = np.where(inexact, odd, bits).view(np.float64)
    return s.astype(dtype)


def apply() -> list[str]:
    """Patch the installed interpreter where it needs it; returns the fixes applied."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return []
    from packaging.version import Version

    version = Version(triton.__version__).release
    applied = []
    if version < (3, 7) and Version(np.__version__).release >= (2, 4):
        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = patched
        applied.append("index")
    if version < (3, 9):

        def create_fma(self, x, y, z):
            return interpreter.TensorHandle(fma_rounded_once(x.data, y.data, z.data),
                                            z.dtype.scalar)

        interpreter.InterpreterBuilder.create_fma = create_fma
        applied.append("fma")
    return applied
