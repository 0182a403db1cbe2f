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

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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

    def get_benchmarker(self):
        """Triton 3.6's autotuner times a key's configs even when pruning leaves one (3.9
        skips that); nothing runs here, so every config gets the same time, without a call
        (a call would add a launch the tests count)."""
        return lambda fn, quantiles=None, **kw: [1.0] * len(quantiles) if quantiles else 1.0


def install() -> None:
    """Make :class:`FakeCuda` Triton's active driver."""
    _driver.set_active(FakeCuda())


def wrappers_as_on_gpu() -> None:
    """:func:`install`, and qcompile's kernel wrappers taking their CUDA branches on CPU
    tensors: every ``qcompile.backends.triton`` module's ``interpreting()`` False, 132 SMs,
    every tensor a kernel device, the ``qcompile::`` ops on their kernels. Autotuners keep
    their first config (``QCOMPILE_TRITON_TUNE=first``: nothing can be timed). For a process
    of its own (benchmarks, test workers): nothing here is undone."""
    import importlib
    import pkgutil

    install()
    os.environ["QCOMPILE_TRITON_TUNE"] = "first"
    import qcompile.backends.triton as pkg
    from qcompile.backends.triton import ops, runtime

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "interpreting"):
            mod.interpreting = lambda: False
        if hasattr(mod, "sm_count"):
            mod.sm_count = lambda device: 132
    runtime.kernel_device = lambda t: True
    ops._use_kernel = lambda t: True


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "i32": "int32",
           "u8": "uint8", "i8": "int8", "fp8e4nv": "float8_e4m3fn", "i64": "int64",
           "i1": "bool"}


def placeholders(args: dict, consts: dict | None = None) -> dict:
    """Kernel arguments as ``tests/test_triton_compile_sm90.py``'s builders describe them
    (``"*bf16"`` for a pointer, numbers as they are), with each pointer a small zero tensor of
    that dtype (16-byte aligned, as Triton's specialization assumes there), and each TMA
    descriptor (``"tensordesc<i32[R, C]>"``, or a function of ``consts`` giving one) a
    :class:`~triton.tools.tensor_descriptor.TensorDescriptor` of that block over a zero
    tensor of 4 x 2 blocks."""
    import re

    from triton.tools.tensor_descriptor import TensorDescriptor

    def one(v):
        if callable(v):
            v = v(consts or {})
        if isinstance(v, str) and v.startswith("tensordesc"):
            dtype, dims = re.match(r"tensordesc<(\w+)\[([\d, ]+)\]>", v).groups()
            block = [int(d) for d in dims.split(",")]
            shape = [4 * block[0], 2 * block[1]]
            base = torch.zeros(*shape, dtype=getattr(torch, _DTYPES[dtype]))
            return TensorDescriptor(base, shape, [shape[1], 1], block)
        if isinstance(v, str):
            return torch.zeros(256, dtype=getattr(torch, _DTYPES[v[1:]]))
        return v

    return {k: one(v) for k, v in args.items()}


def run_worker(script: str, what: str) -> dict:
    """Run ``python script OUT`` without ``TRITON_INTERPRET`` and with a fresh Triton cache,
    and return the JSON it wrote to OUT (``pytest.fail`` with its stderr otherwise; a skip
    where the sm_90 toolchain is missing, as for the compile tests the workers build on)."""
    import pytest
    from test_triton_compile_sm90 import _require_toolchain

    _require_toolchain()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        proc = subprocess.run([sys.executable, script, str(out)], env=env,
                              cwd=Path(script).parent, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"{what} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def one_launch(fn) -> tuple:
    """``(fn(), (kernel name, launcher arguments))`` for a call that makes exactly one launch
    (recorded while :data:`RECORD`)."""
    before = len(LAUNCHES)
    got = fn()
    new = LAUNCHES[before:]
    assert len(new) == 1, f"{len(new)} launches"
    return got, new[0]


def same_launch(ref: tuple, got: tuple, tensors) -> None:
    """``got``'s launch is ``ref``'s (each a ``(kernel name, launcher arguments)``): the same
    kernel, compiled kernel, grid and scalars, and tensors of the same dtypes, each pair then
    checked by ``tensors(i, ref_tensor, got_tensor)`` (the caller knows which may move)."""
    (ref_name, ref_args), (name, args) = ref, got
    assert name == ref_name and len(args) == len(ref_args), (name, ref_name)
    for i, (f, p) in enumerate(zip(ref_args, args, strict=True)):
        if i in (6, 7, 8):
            continue  # launch metadata and hooks (see test_triton_launch._same)
        if isinstance(f, torch.Tensor):
            assert isinstance(p, torch.Tensor) and p.dtype == f.dtype, f"argument {i}"
            tensors(i, f, p)
        elif i == 4:
            assert p is f, "another compiled kernel"
        else:
            assert p == f, f"argument {i}: {f!r} != {p!r}"


def run_cases(cases: dict, out: str, reset=None) -> None:
    """A worker's checks: call each of ``cases`` (name -> function) after ``reset()``, and
    write ``{name: {"ok": bool, "error": its traceback}}`` as JSON to ``out``."""
    import traceback

    report: dict[str, dict] = {}
    for name, fn in cases.items():
        if reset is not None:
            reset()
        try:
            fn()
            report[name] = {"ok": True}
        except Exception:  # reported per case
            report[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    Path(out).write_text(json.dumps(report))
