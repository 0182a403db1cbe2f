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


class _NoDerivative(torch.autograd.Function):
    """Runs the op below autograd; its backward names the op and refuses."""

    @staticmethod
    def forward(ctx, name: str, call: Callable, *args):
        ctx.op_name = name
        return call(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"qcompile::{ctx.op_name} has no derivative: quantized ops are for inference. "
            "Run the quantized model under torch.no_grad() / torch.inference_mode(), or train "
            "the full-precision model.")


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
