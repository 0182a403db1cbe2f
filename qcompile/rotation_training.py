"""Differentiable evaluation of a graph under a residual-stream rotation and fake quantization.

Used by ``learn-rotation``: the graph's weights stay as they are; the interpreter applies the
candidate rotation R around each stream reader and writer, fake-quantizes activations and
weights with straight-through gradients, and returns the next-token loss, so the gradient
with respect to R (through its skew-symmetric generator) can be taken without rewriting the
graph at every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.hadamard)
from qcompile.formats.quantize import fake_quantize
from qcompile.formats.spec import FormatSpec
from qcompile.hadamard import orthogonal_matrix

__all__ = ["RotatedQuantInterpreter", "skew_rotation", "ste_fake_quantize"]

_LINEAR = torch.ops.aten.linear.default


def skew_rotation(gen: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix ``exp(G - G^T)`` of a square generator ``G`` (differentiable)."""
    return torch.linalg.matrix_exp(gen - gen.T)


def ste_fake_quantize(x: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """``fake_quantize(x)`` in the forward pass, identity gradient (straight-through)."""
    with torch.no_grad():
        q = fake_quantize(x.detach(), spec)
    return x + (q - x).detach()


class RotatedQuantInterpreter(fx.Interpreter):
    """Run a captured graph with R1 applied around the stream's linears and fake quantizers.

    With rotation R (``None``: the identity), for every linear in ``quantized``:
        reader (reads a stream norm):  ``y = Q_a(x R) Q_w(W R)^T + b``
        writer (writes the stream):    ``y = (Q_a(x) Q_w(R^T W)^T + b R) R^T``
        any other:                     ``y = Q_a(x) Q_w(W)^T + b``
    which is the function of the graph with R folded in and then quantized (the residual
    stream is kept in the unrotated basis: weightless RMSNorm commutes with R). Readers in
    ``groups`` (group index per linear) also take learned smoothing scales
    ``s = exp(log_scales[group])``: ``Q_a(x R / s) Q_w((W R) diag(s))^T``, the function of
    the graph with R folded and then ``s`` smoothed into the norm the group reads. Linears not
    in ``quantized`` (heads) run as they are, since R cancels there exactly. Online
    ``qcompile::hadamard`` ops run as dense matmuls so gradients flow through them.

    Args:
        gm: The graph (its weights are read, never changed).
        readers: Linears reading the stream.
        writers: Linears writing the stream.
        quantized: Linears fake-quantized in the loop.
        a_spec: Activation format (every quantized linear's input).
        w_spec: Weight format, or None for full-precision weights.
        groups: Reader -> index of its smoothing-scale row (readers of one norm share one).
    """

    def __init__(self, gm: fx.GraphModule, readers: Iterable[fx.Node], writers: Iterable[fx.Node],
                 quantized: Iterable[fx.Node], a_spec: FormatSpec, w_spec: FormatSpec | None,
                 groups: dict[fx.Node, int] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.readers, self.writers = set(readers), set(writers)
        self.quantized = set(quantized)
        self.a_spec, self.w_spec = a_spec, w_spec
        self.groups = dict(groups or {})
        self.rot: torch.Tensor | None = None
        self.log_scales: torch.Tensor | None = None
        self._inputs: dict[tuple[fx.Node, bool], torch.Tensor] = {}
        self._hadamards: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def loss(self, rot: torch.Tensor | None, ids: torch.Tensor,
             reference: torch.Tensor | None = None,
             log_scales: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``ids`` (``[batch, seq]``) under ``rot``.

        Args:
            rot: The rotation (None: the identity).
            ids: Token ids.
            reference: Full-precision logits of ``ids``: the loss is then the mean over
                tokens of ``KL(softmax(reference) || softmax(logits))`` (distillation);
                without it, the mean next-token cross entropy.
            log_scales: ``[groups, hidden]`` log smoothing scales (None: no smoothing).
        """
        self.rot, self.log_scales = rot, log_scales
        try:
            logits = self.run(ids)
        finally:
            self.rot, self.log_scales = None, None
        if not isinstance(logits, torch.Tensor):
            logits = logits[0]
        v = logits.shape[-1]
        if reference is not None:
            return F.kl_div(F.log_softmax(logits.reshape(-1, v).float(), dim=-1),
                            F.log_softmax(reference.reshape(-1, v).float(), dim=-1),
                            reduction="batchmean", log_target=True)
        return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluate the graph once (the per-run input cache starts and ends empty)."""
        self._inputs.clear()
        try:
            return super().run(*args, **kwargs)
        finally:
            self._inputs.clear()

    def _wq(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.w_spec is None else ste_fake_quantize(w, self.w_spec)

    def _input(self, node: fx.Node, x: torch.Tensor, rotate: bool,
               scale: torch.Tensor | None = None) -> torch.Tensor:
        # q/k/v (gate/up) read one input: rotate, scale and quantize it once per run
        key = (node, rotate)
        if key not in self._inputs:
            xr = x @ self.rot.to(x.dtype) if rotate and self.rot is not None else x
            xr = xr / scale.to(x.dtype) if scale is not None else xr
            self._inputs[key] = ste_fake_quantize(xr, self.a_spec)
        return self._inputs[key]

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        if n.target is torch.ops.qcompile.hadamard.default:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x, size = args[0], int(args[1])
            key = (size, x.dtype, x.device)
            if key not in self._hadamards:
                h = orthogonal_matrix(size, "hadamard").matrix
                self._hadamards[key] = h.to(dtype=x.dtype, device=x.device)
            shape = x.shape
            return (x.reshape(*shape[:-1], shape[-1] // size, size)
                    @ self._hadamards[key]).reshape(shape)
        if n.target is not _LINEAR or n not in self.quantized:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        x, w = args[0], args[1].detach()
        b = args[2].detach() if len(args) > 2 and args[2] is not None else None
        rot = self.rot
        group = self.groups.get(n) if self.log_scales is not None else None
        if n in self.readers and (rot is not None or group is not None):
            wr = w @ rot.to(w.dtype) if rot is not None else w
            scale = None
            if group is not None:
                scale = self.log_scales[group].exp()
                wr = wr * scale.to(w.dtype)
            return F.linear(self._input(n.args[0], x, True, scale), self._wq(wr), b)
        if rot is not None and n in self.writers:
            r = rot.to(w.dtype)
            y = F.linear(self._input(n.args[0], x, False), self._wq(r.T @ w),
                         None if b is None else b @ r)
            return y @ r.T
        return F.linear(self._input(n.args[0], x, False), self._wq(w), b)
