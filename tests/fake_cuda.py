"""A stand-in CUDA driver for Triton on a machine without a GPU.

Kernels compile for real (sm_90, with Triton's own ``ptxas``), and everything Triton's Python
launch path does runs for real; only loading the cubin and the final launch are replaced: the
launcher records its arguments instead. ``tests/test_triton_launch.py`` checks with it that
:func:`qcompile.backends.triton.launch.launch` passes the launcher what ``kernel[grid](...)``
passes, and ``benchmarks/launch_overhead.py`` times both paths' host work.

Use it in a process whose kernels are real ``JITFunction`` objects (``TRITON_INTERPRET`` unset
when the kernel modules are imported), and call :func:`install` before the first launch.
"""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as _driver

#: Every launch as ``(kernel name, launcher arguments)``, oldest first, while :data:`RECORD`.
LAUNCHES: list[tuple[str, tuple]] = []
RECORD = True


class _Launcher:
    def __init__(self, src, metadata) -> None:
        self.name = metadata.name

    def __call__(self, *args) -> None:
        if RECORD:
            LAUNCHES.append((self.name, args))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 32, 0, 1024  # module, function, registers, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}


class FakeCuda:
    """The driver methods Triton's compile and launch path call, for an H100 (sm_90)."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 7

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def install() -> None:
    """Make :class:`FakeCuda` Triton's active driver."""
    _driver.set_active(FakeCuda())
