"""Defining ``torch.ops.qcompile.*`` with a short dispatch path.

``torch.library.custom_op`` runs every call through a Python autograd wrapper and a
dynamo-disabling decorator before the implementation. Dispatching a do-nothing op took 6.7 us
that way on a 2-core CPU, and 3.7 us defined here (``benchmarks/host_overhead.py``). Batch-1
decoding without CUDA graphs calls the fused linear
ops over a hundred times per token, and the host pays that cost on every call. An op defined here
is a plain ``torch.library`` schema with:

- the implementation on ``CompositeExplicitAutograd`` (every device; one hop from the
  dispatcher into Python);
- the fake (meta) implementation, for ``torch.export`` and ``torch.compile``;
- an ``Autograd`` kernel. It passes straight through when no input requires grad. Otherwise
  its outputs carry a node whose backward raises an error that names the op.
  ``custom_op`` also errors at backward. Without this kernel, autograd would differentiate
  through the reference implementation's rounding and silently give zero or wrong gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["define_op"]

_LIB = torch.library.Library("qcompile", "FRAGMENT")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


_LIB.define("no_derivative(Tensor grad, SymInt[] shape, ScalarType dtype, str op) -> Tensor")


def _no_derivative(grad: torch.Tensor, shape: list[int], dtype: torch.dtype, op: str
                   ) -> torch.Tensor:
    raise RuntimeError(
        f"qcompile::{op} has no derivative: quantized ops are for inference. Run the quantized "
        "model under torch.no_grad() / torch.inference_mode(), or train the full-precision model.")


def _no_derivative_fake(grad: torch.Tensor, shape: list[int], dtype: torch.dtype, op: str
                        ) -> torch.Tensor:
    return grad.new_empty(shape, dtype=dtype)


_LIB.impl("no_derivative", _no_derivative, "CompositeExplicitAutograd")
torch.library.register_fake("qcompile::no_derivative", _no_derivative_fake, lib=_LIB)


class _NoDerivative(torch.autograd.Function):
    """Runs the op below autograd; its backward names the op and refuses.

    The refusal is an op (``qcompile::no_derivative``) rather than a ``raise`` in ``backward``:
    AOTAutograd traces the backward of a graph compiled with grad enabled (a forward call
    outside ``torch.no_grad()``), and a ``raise`` there would fail the compile although only the
    forward is wanted. Traced, the op has a shapes-only implementation; run, it raises.
    """

    @staticmethod
    def forward(ctx, name: str, call: Callable, *args):
        ctx.op_name = name
        ctx.inputs = [(a.shape, a.dtype) if isinstance(a, torch.Tensor) else None for a in args]
        return call(*args)

    @staticmethod
    def backward(ctx, *grads):
        grad = next(g for g in grads if g is not None)
        out: list[torch.Tensor | None] = [None, None]
        for needs, meta in zip(ctx.needs_input_grad[2:], ctx.inputs, strict=True):
            out.append(torch.ops.qcompile.no_derivative(grad, list(meta[0]), meta[1],
                                                        ctx.op_name) if needs else None)
        return tuple(out)


def _requires_grad(args: tuple) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def _autograd_kernel(op: torch._ops.OpOverload, name: str) -> Callable:
    """The ``Autograd`` kernel of ``op`` (registered ``with_keyset``)."""

    def below_autograd(keyset, *args):
        return op.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    def autograd(keyset, *args):
        if torch.is_grad_enabled() and _requires_grad(args):
            return _NoDerivative.apply(name, lambda *a: below_autograd(keyset, *a), *args)
        return below_autograd(keyset, *args)

    return autograd


def define_op(schema: str, fake: Callable) -> Callable[[Callable], torch._ops.OpOverload]:
    """Decorator: define ``qcompile::<schema>`` with the decorated function as its
    implementation and ``fake`` as its fake implementation.

    Args:
        schema: The op's schema without the namespace, e.g.
            ``"hadamard(Tensor x, SymInt size) -> Tensor"``.
        fake: Shapes-only implementation (same arguments).

    Returns:
        A decorator that returns the op's default overload (``torch.ops.qcompile.<name>.default``).
        Calling it dispatches like any aten op.
    """
    name = schema.split("(", 1)[0]

    def register(impl: Callable) -> torch._ops.OpOverload:
        _LIB.define(schema)
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"qcompile::{name}", fake, lib=_LIB)
        op = getattr(torch.ops.qcompile, name).default
        _LIB.impl(name, _autograd_kernel(op, name), "Autograd", with_keyset=True)
        op.__doc__ = impl.__doc__
        return op

    return register
