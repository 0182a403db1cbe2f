"""Save and load quantized graphs: tensors in safetensors, graph and report in JSON.

No pickle anywhere. The graph is written node by node; call targets are written by name and
resolved on load only inside an allow-list of namespaces (``torch.ops.*``, ``operator``,
``math``, ``builtins``), so loading an artifact cannot run arbitrary code.

Layout of an artifact directory::

    qcompile.json        manifest: format version, source model, pipeline, report, graph
    model.safetensors    every parameter/buffer the graph reads, by dotted name
    tokenizer files      as written by the tokenizer's save_pretrained (JSON)
"""

from __future__ import annotations

import builtins
import importlib
import json
import math
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors.torch import load_file, save_file

import qcompile.ops  # noqa: F401  (the graph may call torch.ops.qcompile.*)
from qcompile.errors import ArtifactError
from qcompile.graph import get_attr_value, set_attr_value

__all__ = ["ARTIFACT_FORMAT", "is_artifact", "load_quantized", "save_quantized"]

ARTIFACT_FORMAT = "qcompile-artifact/1"
MANIFEST = "qcompile.json"
TENSORS = "model.safetensors"
_PY_MODULES = {"operator": operator, "_operator": operator, "math": math, "builtins": builtins}
_MEMORY_FORMATS = {str(m).split(".")[-1]: m for m in (
    torch.contiguous_format, torch.channels_last, torch.preserve_format)}
_LAYOUTS = {str(m).split(".")[-1]: m for m in (torch.strided, torch.sparse_coo)}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        raise ArtifactError(f"cannot save a call to op packet {target}; expected an overload")
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None)
    if module in _PY_MODULES and name:
        return f"{module}.{name}"
    if module and module.startswith("torch") and name:
        return f"{module}.{name}"
    raise ArtifactError(f"cannot save a call to {target!r}: not a torch op or builtin")


def _resolve_target(text: str) -> Any:
    if text.startswith("torch.ops."):
        obj: Any = torch.ops
        for atom in text[len("torch.ops."):].split("."):
            obj = getattr(obj, atom)
        return obj
    module, _, name = text.rpartition(".")
    if module in _PY_MODULES:
        return getattr(_PY_MODULES[module], name)
    if module == "torch" or module.startswith("torch."):
        return getattr(importlib.import_module(module), name)
    raise ArtifactError(f"artifact calls {text!r}, which is outside the allowed namespaces")


def _enc(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_enc(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_enc(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _enc(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).split(".")[-1]}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).split(".")[-1]}
    if isinstance(value, torch.layout):
        return {"layout": str(value).split(".")[-1]}
    if isinstance(value, slice):
        return {"slice": [_enc(value.start), _enc(value.stop), _enc(value.step)]}
    raise ArtifactError(f"cannot save graph argument {value!r} of type {type(value).__name__}")


def _dec(value: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, v), = value.items()
    if kind == "node":
        return nodes[v]
    if kind == "float":
        return float(v)
    if kind == "tuple":
        return tuple(_dec(x, nodes) for x in v)
    if kind == "list":
        return [_dec(x, nodes) for x in v]
    if kind == "dict":
        return {k: _dec(x, nodes) for k, x in v.items()}
    if kind == "dtype":
        return getattr(torch, v)
    if kind == "device":
        return torch.device(v)
    if kind == "memory_format":
        return _MEMORY_FORMATS[v]
    if kind == "layout":
        return _LAYOUTS[v]
    if kind == "slice":
        return slice(*(_dec(x, nodes) for x in v))
    raise ArtifactError(f"unknown graph argument encoding {kind!r}")


def graph_to_json(gm: torch.fx.GraphModule) -> list[dict]:
    """The graph's nodes as JSON-able dicts, in order."""
    out = []
    for n in gm.graph.nodes:
        item = {"op": n.op, "name": n.name}
        if n.op == "call_function":
            item["target"] = _target_name(n.target)
        elif n.op in ("get_attr", "placeholder"):
            item["target"] = n.target
        else:
            if n.op != "output":
                raise ArtifactError(f"cannot save node {n.name} with op {n.op!r}")
        item["args"] = _enc(tuple(n.args))
        item["kwargs"] = _enc(dict(n.kwargs))
        if "source_module" in n.meta:
            item["source_module"] = n.meta["source_module"]
        out.append(item)
    return out


def graph_from_json(items: list[dict], root: torch.nn.Module) -> torch.fx.GraphModule:
    """Rebuild a GraphModule over ``root`` (which holds the tensors) from ``graph_to_json``."""
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for item in items:
        args = _dec(item["args"], nodes)
        kwargs = _dec(item["kwargs"], nodes)
        op = item["op"]
        if op == "placeholder":
            node = graph.placeholder(item["target"])
        elif op == "get_attr":
            node = graph.get_attr(item["target"])
        elif op == "call_function":
            node = graph.call_function(_resolve_target(item["target"]), args, kwargs)
        elif op == "output":
            node = graph.output(args[0])
        else:
            raise ArtifactError(f"artifact holds node {item['name']} with unknown op {op!r}")
        node.name = item["name"]
        if "source_module" in item:
            node.meta["source_module"] = item["source_module"]
        nodes[item["name"]] = node
    graph.lint()
    return torch.fx.GraphModule(root, graph)


#: ``gm.meta`` keys set by capture that artifacts keep (JSON-able). ``tied_params`` is not one
#: of them: tied tensors are stored once per name, so a loaded graph's copies are untied.
GRAPH_META = ("source_model", "seq_range", "batch", "sliding_window")


def save_quantized(gm: torch.fx.GraphModule, out_dir: str | Path, *, tokenizer: Any = None,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Write ``gm`` (and optionally its tokenizer) as an artifact directory.

    Args:
        gm: The (quantized) graph.
        out_dir: Directory to create or overwrite files in.
        tokenizer: Saved with ``save_pretrained`` when given.
        metadata: JSON-able facts to keep (source model, pipeline, report, ...).

    Returns:
        The directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"})
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    params = []
    for t in targets:
        value = get_attr_value(gm, t)
        if isinstance(value, torch.nn.Parameter):
            params.append(t)
        value = value.detach().cpu()
        # safetensors refuses shared storage; tied tensors are stored once per name.
        key = value.untyped_storage().data_ptr()
        tensors[t] = value.clone().contiguous() if key in seen else value.contiguous()
        seen.setdefault(key, t)
    save_file(tensors, str(out / TENSORS))
    manifest = {
        "format": ARTIFACT_FORMAT,
        "qcompile_version": __import__("qcompile").__version__,
        "metadata": metadata or {},
        "parameters": params,
        "graph": graph_to_json(gm),
        "graph_meta": {k: gm.meta[k] for k in GRAPH_META if k in gm.meta},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a qcompile artifact directory."""
    return (Path(path) / MANIFEST).is_file()


def _restore_values(gm: torch.fx.GraphModule) -> None:
    """Give every node the fake ``meta["val"]`` a capture has (shapes, dtypes), by fake-tensor
    propagation with a symbolic sequence length: the graph JSON does not store them, and the
    passes that find attention, heads or single-row linears read them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    lo, hi = gm.meta.get("seq_range", (1, 4096))
    seq = lo if lo == hi else min(max(lo, 8), hi)
    seq_dim = DimDynamic.STATIC if lo == hi else DimDynamic.DYNAMIC
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    example = mode.from_tensor(
        torch.zeros(int(gm.meta.get("batch", 1)), seq, dtype=torch.long),
        symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, seq_dim]))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(example)


def load_quantized(path: str | Path, *, with_tokenizer: bool = True
                   ) -> tuple[torch.fx.GraphModule, Any, dict[str, Any]]:
    """Load an artifact written by ``save_quantized``.

    Returns:
        ``(graph_module, tokenizer or None, metadata)``.

    Raises:
        ArtifactError: Missing files, an unknown format version, or tensors that do not
            match the graph.
    """
    path = Path(path)
    if not is_artifact(path):
        raise ArtifactError(f"{path} is not a qcompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path} has format {manifest.get('format')!r}; this qcompile reads {ARTIFACT_FORMAT}"
        )
    if not (path / TENSORS).is_file():
        raise ArtifactError(f"{path} lacks {TENSORS}")
    tensors = load_file(str(path / TENSORS))
    root = torch.nn.Module()
    params = set(manifest.get("parameters", []))
    for name, t in tensors.items():
        set_attr_value(root, name, torch.nn.Parameter(t, requires_grad=False)
                       if name in params else t)
    wanted = {n["target"] for n in manifest["graph"] if n["op"] == "get_attr"}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ArtifactError(f"{path / TENSORS} lacks tensors the graph reads: {missing[:5]}")
    gm = graph_from_json(manifest["graph"], root)
    meta = manifest.get("graph_meta", {})
    for key in GRAPH_META:
        if key in meta:  # JSON lists back to the tuples capture records
            value = meta[key]
            gm.meta[key] = tuple(value) if key == "seq_range" else value
    _restore_values(gm)
    tokenizer = None
    if with_tokenizer and (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return gm, tokenizer, manifest.get("metadata", {})
