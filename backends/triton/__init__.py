"""Triton kernels for CUDA and the ``lower-triton`` pass's fused ops.

Importing this package does not import triton. Kernel modules (``fp8_gemm``, ``w4a16``,
``w4a8``, ``act_quant``) import it when used; each has a plain PyTorch reference function, a
wrapper that checks its inputs and launches, and an autotune config list. The fused graph ops
(``qcompile::w4a16_linear`` and friends, :mod:`qcompile.backends.triton.ops`) run those
references on the CPU and the kernels on CUDA.

On a machine without a GPU the kernels still run under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors), which is how CI checks their logic. The interpreter
truncates fp32 -> bf16/fp8 casts instead of rounding to nearest even, so kernels round onto the
FP8/INT grids themselves (:func:`qcompile.backends.triton.runtime.round_fp8_e4m3`) and cast
only values that are already exact; bf16 outputs are compared with a one-ulp tolerance there.
"""
