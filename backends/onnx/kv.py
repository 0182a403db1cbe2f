"""KV-cache plumbing for the decoder export: past/present key-value inputs and outputs.

A captured graph computes ``input_ids -> logits`` for a whole sequence. The decoder export
keeps that graph and changes, at translation time:

1. every attention's cached key and value (where :func:`qcompile.attention.find_attention`
   says a KV cache stores them: after RoPE, any R3 Hadamard and KV quantization, before the
   GQA head repeat) is concatenated after the graph input ``past_key_values.<i>.key`` /
   ``.value`` (``[batch, kv_heads, past, head_dim]``) along the sequence; the concatenation
   is also the output ``present.<i>.key`` / ``.value``;
2. token positions ``arange(seq)`` become ``arange(past, past + seq)``, so RoPE sees absolute
   positions;
3. each attention runs with a causal mask over ``past + seq`` keys (query ``i`` sees keys
   ``j <= past + i``) instead of the graph's own mask. Because that drops any other masking
   (sliding windows, padding), :func:`check_causal` first runs the graph on a probe and
   refuses a graph whose masks are not plainly causal.

Per-token KV quantization commutes with the concatenation (each token is quantized on its
own), so a cache of quantize-dequantized values gives the reference's numerics.

With fusion on (the export default) steps 1 and 3 are one opset-23 ``Attention`` node per
layer instead: it reads the cached key/value and ``past_key_values`` and returns ``present``
(see :mod:`qcompile.backends.onnx.fuse`); the graph's own mask and head repeat go dead.
The causal probe (:func:`causal_masks`) is made longer than the model's sliding window
(``gm.meta["sliding_window"]``), so a window the probe would not reach cannot pass as causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from onnx import TensorProto, helper
from torch import fx

from qcompile.attention import find_attention
from qcompile.backends.onnx.aten_nn import attention
from qcompile.backends.onnx.fuse import attention_node, fusable_attention
from qcompile.backends.onnx.translate import Translator
from qcompile.errors import UnsupportedGraphError
from qcompile.formats import parse_format

__all__ = ["KVLayer", "causal_masks", "check_causal", "plan_kv"]

aten = torch.ops.aten


@dataclass(frozen=True)
class KVLayer:
    """One attention's cache: where it is in the graph and its ONNX names."""

    key: tuple[fx.Node, fx.Node]
    value: tuple[fx.Node, fx.Node]
    kv_heads: int
    head_dim: int
    v_head_dim: int
    past_key: str
    past_value: str


def _is_seq_arange(node: fx.Node, seq: fx.Node) -> bool:
    if node.target is aten.arange.default:
        return node.args[0] is seq
    if node.target is aten.arange.start:
        return node.args[0] == 0 and node.args[1] is seq
    return False


def _kv_format_ok(node: fx.Node) -> None:
    """Refuse a KV quantization whose scale spans tokens (it would not commute with caching)."""
    if node.target is torch.ops.qcompile.quantize_activation.default:
        spec = parse_format(node.args[1])
        if spec.granularity == "tensor":
            raise UnsupportedGraphError(
                f"KV-cache export: node {node.name} quantizes the cache per tensor ({spec}); "
                f"a cached decode needs per-token or per-group KV formats"
            )


def causal_masks(gm: fx.GraphModule, probe_len: int = 48) -> tuple[int, dict[fx.Node, bool]]:
    """Run ``gm`` on a probe; say for every SDPA node whether its mask is the plain causal one.

    Returns:
        The probe length used, and SDPA node -> mask is plainly causal (``is_causal`` without
        a mask, or a mask equal to the lower triangle).
    """
    lo, hi = gm.meta.get("seq_range", (1, probe_len))
    window = gm.meta.get("sliding_window")
    if isinstance(window, int) and window < hi:
        probe_len = max(probe_len, window + 16)  # long enough for the window to show
    n = max(min(probe_len, hi), lo)
    masks: dict[fx.Node, object] = {}

    class _Probe(fx.Interpreter):
        def run_node(self, node: fx.Node):  # noqa: D102 (fx hook)
            out = super().run_node(node)
            if node.op == "call_function" and node.target is \
                    aten.scaled_dot_product_attention.default:
                args = dict(zip(("q", "k", "v", "attn_mask", "dropout_p", "is_causal"),
                                node.args, strict=False), **node.kwargs)
                masks[node] = (self.env_value(node, args.get("attn_mask")),
                               bool(args.get("is_causal", False)))
            return out

        def env_value(self, node: fx.Node, arg: object) -> object:
            return self.env[arg] if isinstance(arg, fx.Node) else arg

    ids = torch.arange(n, dtype=torch.long).remainder(7).add(3).unsqueeze(0)
    with torch.inference_mode():
        _Probe(gm).run(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    verdict: dict[fx.Node, bool] = {}
    for node, (mask, is_causal) in masks.items():
        ok = mask is None and is_causal
        if not ok and isinstance(mask, torch.Tensor) and not is_causal:
            m = mask if mask.dtype == torch.bool else mask == 0
            ok = m.shape[-2:] == (n, n) and bool((m == causal).all())
        verdict[node] = ok
    return n, verdict


def check_causal(gm: fx.GraphModule, probe_len: int = 48) -> int:
    """Run ``gm`` on a probe and check that every SDPA mask is the plain causal mask.

    Returns:
        The probe length used.

    Raises:
        UnsupportedGraphError: A mask differs from causal (sliding window, padding, ...),
            naming the attention node.
    """
    n, verdict = causal_masks(gm, probe_len)
    for node, ok in verdict.items():
        if not ok:
            raise UnsupportedGraphError(
                f"KV-cache export: attention {node.name} "
                f"({node.meta.get('source_module', '')}) does not use a plain causal mask on a "
                f"{n}-token probe (sliding window or padding mask?); export without kv_cache"
            )
    return n


def plan_kv(t: Translator, input_ids: fx.Node, fuse: bool = False
            ) -> tuple[list[KVLayer], list, list, dict[str, str]]:
    """Install the KV-cache rewrites on ``t``.

    With ``fuse``, each attention that :func:`~qcompile.backends.onnx.fuse.fusable_attention`
    accepts becomes one opset-23 ``Attention`` node that takes the past key/value and returns
    the present ones (no Concat, head repeat or mask plumbing); the others get the
    concatenation and mask below.

    Returns:
        The layers, the ONNX graph inputs to add, the outputs to add as
        ``(name, kv_heads, head_dim)``, and a dict that, once the graph is translated, maps
        each output name to the value holding it.

    Raises:
        UnsupportedGraphError: No attention, an eager attention, or a cache that cannot be
            located (the message names the attention).
    """
    sites = find_attention(t.gm)
    if not sites:
        raise UnsupportedGraphError("KV-cache export: the graph has no attention")
    seq = next((n for n in t.gm.graph.nodes if n.target is aten.sym_size.int
                and n.args[0] is input_ids and n.args[1] == 1), None)
    layers: list[KVLayer] = []
    for i, site in enumerate(sites):
        if site.kind != "sdpa":
            raise UnsupportedGraphError(
                f"KV-cache export: attention {site.name} is eager (matmul/softmax); only "
                f"scaled_dot_product_attention graphs get a cache"
            )
        _kv_format_ok(site.k[0])
        _kv_format_ok(site.v[0])
        t.b.reserve(f"present.{i}.key")
        t.b.reserve(f"present.{i}.value")
        layers.append(KVLayer(site.k, site.v, site.kv_heads, site.head_dim, site.v_head_dim,
                              t.b.reserve(f"past_key_values.{i}.key"),
                              t.b.reserve(f"past_key_values.{i}.value")))
    past_len = t.b.op("Shape", [layers[0].past_key], "past_len", start=2, end=3)
    presents: dict[str, str] = {}

    def concat_after(producer: fx.Node, consumer: fx.Node, past: str, label: str):
        previous = t.node_override.get(producer)

        def handler(tr: Translator, node: fx.Node):
            value = previous(tr, node) if previous else tr.handlers[node.target](tr, node)
            tr.env[node] = value
            cat = tr.b.op("Concat", [past, tr.val(node)], label, axis=2)
            tr.edge_override[(node, consumer)] = cat
            presents[label] = cat
            return value
        t.node_override[producer] = handler

    def fused(site, i: int, layer: KVLayer):
        def handler(tr: Translator, node: fx.Node) -> str:
            y, key, value = attention_node(tr, site, (layer.past_key, layer.past_value))
            presents[f"present.{i}.key"] = key
            presents[f"present.{i}.value"] = value
            return y
        return handler

    for i, (site, layer) in enumerate(zip(sites, layers, strict=True)):
        if fuse and not fusable_attention(site):
            t.node_override[site.node] = fused(site, i, layer)
            continue
        concat_after(*layer.key, layer.past_key, f"present.{i}.key")
        concat_after(*layer.value, layer.past_value, f"present.{i}.value")
        t.node_override[site.node] = _causal_sdpa
    for node in t.gm.graph.nodes:
        if node.op == "call_function" and seq is not None and _is_seq_arange(node, seq):
            t.node_override[node] = _offset_arange(past_len)
    inputs, outputs = [], []
    for i, layer in enumerate(layers):
        for kind, past, d in (("key", layer.past_key, layer.head_dim),
                              ("value", layer.past_value, layer.v_head_dim)):
            inputs.append(helper.make_tensor_value_info(
                past, TensorProto.FLOAT, ["batch", layer.kv_heads, "past_sequence", d]))
            outputs.append((f"present.{i}.{kind}", layer.kv_heads, d))
    return layers, inputs, outputs, presents


def _offset_arange(past_len: str):
    def handler(t: Translator, node: fx.Node) -> str:
        end = node.args[0] if node.target is aten.arange.default else node.args[1]
        start = t.b.op("Squeeze", [past_len, t.b.const([0])])
        stop = t.b.op("Add", [start, t.scalar_int(end)])
        return t.b.op("Range", [start, stop, t.b.const(1)], node.name)
    return handler


def _causal_sdpa(t: Translator, node: fx.Node) -> str:
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
                    node.args, strict=False), **node.kwargs)
    q = args["query"]
    shape = t.shape(q)
    head_dim = int(shape[-1]) if shape and shape[-1].isdigit() else None
    if head_dim is None:
        raise UnsupportedGraphError(f"attention {node.name} has no static head dim")
    return attention(t, t.val(q), t.val(args["key"]), t.val(args["value"]), None, False, True,
                     args.get("scale"), head_dim, node.name)
