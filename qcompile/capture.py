"""Capture a language model into a plain aten-level ``torch.fx.GraphModule``.

The captured graph is what every pass works on. Its contract:

* one placeholder, ``input_ids`` (int64 ``[batch, seq]``), and one output, the logits tensor:
  ``gm(input_ids) -> logits``. There is no pytree in/out spec: the graph uses the default
  ``CodeGen``.
* parameters and buffers are ``get_attr`` nodes whose targets are the model's own fully
  qualified names (``model.layers.0.self_attn.q_proj.weight``), bound to the *same* tensor
  objects as the model's (no copy). Passes must replace an attribute (:func:`set_attr_tensor`)
  rather than modify it in place, or they also change the eager model.
* tied weights (e.g. ``model.embed_tokens.weight`` and ``lm_head.weight``) are two attributes
  bound to one tensor, each read by its own ``get_attr`` node named after the module that uses it;
  ``gm.meta["tied_params"]`` lists such groups. Replacing one of them unties it.
* ops are the ATen ops of ``torch.export``'s pre-dispatch IR, undecomposed: ``aten.linear``,
  ``aten.embedding``, ``aten.scaled_dot_product_attention``, ``aten.silu`` and so on.
* every ``call_function`` node has ``meta["source_module"]``, the qualified name of the
  innermost module that produced it ("" for the top level), plus export's ``meta["val"]``.
* export's input guard (the ``_guards_fn`` submodule) and the ``aten._assert_*`` metadata
  checks are removed: they pin device and dtype, which later passes and :func:`move_graph`
  change. The sequence range is recorded in ``gm.meta["seq_range"]`` instead. Eval-mode
  ``aten.dropout`` and ``aten.alias`` (no-ops) are removed too; dtype casts (``aten.to``) stay.
* ``gm.meta`` holds ``source_model`` (class path), ``seq_range`` (min, max), ``batch``,
  ``tied_params`` (tuples of attribute names bound to one tensor) and ``sliding_window`` (the
  config's attention window, None without one: a mask probe must be longer to see it).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

from qcompile.errors import CaptureError
from qcompile.graph import get_attr_value, set_attr_value

__all__ = ["capture", "move_graph"]

_WRAPPED = "wrapped"  # attribute name of the user model inside the export wrapper
_PREFIX = _WRAPPED + "."

# Metadata checks export leaves behind; they have no users and only assert dtype/device/ranges.
_ASSERT_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten.sym_constrain_range.default,
}


class _LogitsOnly(nn.Module):
    """Calls a model on ``input_ids`` alone and returns only the logits tensor."""

    def __init__(self, model: nn.Module, keyword: bool, use_cache: bool) -> None:
        super().__init__()
        self.add_module(_WRAPPED, model)
        self._keyword = keyword
        self._use_cache = use_cache

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = getattr(self, _WRAPPED)
        if not self._keyword:
            out = model(input_ids)
        elif self._use_cache:
            out = model(input_ids=input_ids, use_cache=False)
        else:
            out = model(input_ids=input_ids)
        return _logits_of(out)


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CaptureError(
        f"forward returned {type(out).__name__}; expected a logits tensor or an object "
        "with a .logits tensor"
    )


def _call_convention(model: nn.Module) -> tuple[bool, bool]:
    """Return (pass input_ids by keyword, also pass use_cache=False) for ``model.forward``."""
    name = type(model).__name__
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError) as exc:
        raise CaptureError(f"cannot capture {name}: forward has no signature ({exc})") from exc
    if "input_ids" in params:
        # HF models may take use_cache through **kwargs; a KV cache would only hinder export.
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        return True, "use_cache" in params or (var_kw and hasattr(model, "config"))
    positional = [
        p
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if not positional:
        raise CaptureError(
            f"cannot capture {name}: forward takes no input_ids argument and no positional "
            "tensor argument"
        )
    return False, False


def capture(
    model: nn.Module,
    *,
    example_seq: int = 8,
    batch: int = 1,
    dynamic_seq: bool = True,
    max_seq: int = 4096,
) -> fx.GraphModule:
    """Capture a causal LM into an aten-level GraphModule computing ``input_ids -> logits``.

    Hugging Face causal LMs are called as ``model(input_ids=..., use_cache=False)`` and only
    ``.logits`` is kept; any other module must take one int64 tensor and return a tensor.
    Export runs with ``strict=False`` under ``torch.no_grad()`` with the model in eval mode
    (its previous mode is restored). On CPU the graph's logits are bit-identical to eager ones
    in practice; tests allow ``atol=rtol=1e-5``.

    Args:
        model: The model. It is not copied: the graph shares its parameters.
        example_seq: Sequence length of the example input used for tracing.
        batch: Batch size; it is static (the graph accepts only this batch size).
        dynamic_seq: Make the sequence dimension symbolic, valid for 1..``max_seq``.
        max_seq: Largest sequence length the graph accepts when ``dynamic_seq``.

    Returns:
        A ``torch.fx.GraphModule`` called as ``gm(input_ids) -> logits``; see the module
        docstring for the graph contract and ``gm.meta`` keys.

    Raises:
        CaptureError: The model's forward does not fit, or ``torch.export`` fails.
    """
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise CaptureError(f"cannot capture {name}: expected a torch.nn.Module")
    if batch < 1 or example_seq < 1 or max_seq < example_seq:
        raise CaptureError(
            f"cannot capture {name}: need batch >= 1 and 1 <= example_seq <= max_seq, got "
            f"batch={batch} example_seq={example_seq} max_seq={max_seq}"
        )
    keyword, use_cache = _call_convention(model)
    wrapper = _LogitsOnly(model, keyword, use_cache)
    example = torch.zeros(batch, example_seq, dtype=torch.long, device=_device_of(model))
    dynamic = None
    if dynamic_seq:
        dynamic = {"input_ids": {1: torch.export.Dim("seq", min=1, max=max_seq)}}
    was_training = model.training
    model.eval()
    seq_range = (1, max_seq) if dynamic_seq else (example_seq, example_seq)
    try:
        with torch.no_grad():
            try:
                ep = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic,
                                         strict=False)
            except Exception as exc:
                if not dynamic_seq or "Constraints violated" not in str(exc):
                    raise
                # Some torch/transformers pairs emit a guard export cannot prove for every
                # length (torch 2.11 + transformers 5.17 on CUDA: min(16*seq, 32*seq) ==
                # 16*seq). Let export narrow the range itself, then report what it kept.
                ep = torch.export.export(
                    wrapper, (example,), strict=False,
                    dynamic_shapes={"input_ids": {1: torch.export.Dim.AUTO}})
                seq_range = _auto_seq_range(ep, max_seq, name, exc)
        unlifted = ep.module()
    except CaptureError as exc:  # raised by the wrapper: the output has no logits
        raise CaptureError(f"cannot capture {name}: {exc}") from exc
    except Exception as exc:  # export raises many unrelated types; all mean "cannot capture"
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"cannot capture {name}: torch.export failed: {type(exc).__name__}: {cause}"
        ) from exc
    finally:
        model.train(was_training)

    gm = _rebuild(unlifted, model)
    gm.meta["source_model"] = f"{type(model).__module__}.{name}"
    gm.meta["seq_range"] = seq_range
    gm.meta["batch"] = batch
    gm.meta["tied_params"] = _tied_groups(gm)
    gm.meta["sliding_window"] = _sliding_window(model)
    return gm


def _auto_seq_range(ep, max_seq: int, name: str, first: Exception) -> tuple[int, int]:
    """The sequence range an ``Dim.AUTO`` export kept, within ``1..max_seq``.

    Raises:
        CaptureError: Export made the length static (naming the first export's guard).
    """
    user = set(ep.graph_signature.user_inputs)
    seq = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user
               ).meta["val"].shape[1]
    if isinstance(seq, int):
        guard = str(first).strip().splitlines()[0]
        raise CaptureError(
            f"cannot capture {name} with a dynamic sequence length: torch.export specialized "
            f"it to {seq} ({guard}); capture with dynamic_seq=False and example_seq=<length>")
    bounds = ep.range_constraints.get(seq.node.expr)

    def bound(value, default: int) -> int:
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError, AttributeError):  # sympy/torch infinity
            return default

    lower = bound(bounds.lower, 1) if bounds is not None else 1
    upper = bound(bounds.upper, max_seq) if bounds is not None else max_seq
    return max(1, lower), min(max_seq, upper)


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The config's attention window (None if absent or switched off)."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not isinstance(window, int):
        return None
    return window


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _strip(path: str) -> str:
    """Turn a wrapper-relative qualified name into a model-relative one."""
    if path == _WRAPPED:
        return ""
    return path[len(_PREFIX) :] if path.startswith(_PREFIX) else path


def _source_module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _strip(path)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Map id(tensor) -> every qualified name it has in ``model`` (more than one when tied)."""
    names: dict[int, list[str]] = {}
    for fqn, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(fqn)
    for fqn, t in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(t), []).append(fqn)
    return names


def _rebuild(unlifted: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Copy ``ep.module()``'s graph into a plain GraphModule with model-relative names."""
    old = unlifted.graph
    aliases = _aliases(model)

    def target_for(attr: fx.Node, user: fx.Node) -> str:
        # export keeps one get_attr per tied tensor; give each user the name its module knows.
        default = _strip(str(attr.target))
        value = get_attr_value(unlifted, str(attr.target))
        names = aliases.get(id(value), [])
        if len(names) > 1:
            owner = _source_module(user)
            for fqn in names:
                if fqn.rpartition(".")[0] == owner:
                    return fqn
        return default

    plan: dict[tuple[fx.Node, fx.Node], str] = {}
    values: dict[str, Any] = {}
    for attr in old.find_nodes(op="get_attr"):
        for user in attr.users:
            if user.op == "call_module" or user.target in _ASSERT_OPS:
                continue
            target = target_for(attr, user)
            plan[(attr, user)] = target
            values.setdefault(target, get_attr_value(unlifted, str(attr.target)))

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = old.find_nodes(op="placeholder")
    if len(placeholders) != 1:
        raise CaptureError(f"export produced {len(placeholders)} inputs; expected input_ids")
    env[placeholders[0]] = graph.placeholder("input_ids")
    env[placeholders[0]].meta = dict(placeholders[0].meta)
    attr_nodes: dict[str, fx.Node] = {}
    old_attr_of = {t: a for (a, _u), t in plan.items()}
    for target in values:
        node = graph.get_attr(target)
        node.meta = dict(old_attr_of[target].meta)
        attr_nodes[target] = node

    for node in old.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "call_module" or (node.op == "call_function" and node.target in _ASSERT_OPS):
            if node.users:
                raise CaptureError(f"export left a used guard node {node.name}")
            continue
        if node.op == "output":
            (result,) = node.args[0] if isinstance(node.args[0], (tuple, list)) else node.args
            graph.output(env[result])
            continue

        def arg(n: fx.Node, user: fx.Node = node) -> fx.Node:
            return attr_nodes[plan[(n, user)]] if n.op == "get_attr" else env[n]

        if _is_identity(node):
            env[node] = arg(node.args[0])
            continue
        new = graph.node_copy(node, arg)
        if new.op == "call_function":
            new.meta["source_module"] = _source_module(node)
        env[node] = new

    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(values, graph)


def _is_identity(node: fx.Node) -> bool:
    """True for eval-mode dropout and ``aten.alias``: no-ops that would only hide patterns."""
    if node.op != "call_function" or not isinstance(node.args[0] if node.args else None, fx.Node):
        return False
    if node.target == torch.ops.aten.alias.default:
        return True
    if node.target == torch.ops.aten.dropout.default:
        args = dict(zip(("input", "p", "train"), node.args, strict=False), **node.kwargs)
        return args.get("train") is False or args.get("p") == 0
    return False


def _tied_groups(gm: fx.GraphModule) -> list[tuple[str, ...]]:
    groups: dict[int, list[str]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = get_attr_value(gm, str(node.target))
        names = groups.setdefault(id(value), [])
        if node.target not in names:
            names.append(str(node.target))
    return [tuple(names) for names in groups.values() if len(names) > 1]


def move_graph(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """Move a captured graph to ``device``: its tensors and the device constants in its nodes.

    Export bakes the capture device into ops such as ``aten.arange(..., device=cpu)``, so
    ``gm.to(device)`` alone is not enough; and since ``gm.to`` moves shared parameters in place,
    it would also move the eager model. This rebinds each attribute to a moved copy instead
    (tied attributes stay tied), rewrites device constants, and returns ``gm`` (changed in place).
    """
    device = torch.device(device)
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old kept alive, new)
    for node in gm.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        value = get_attr_value(gm, target)
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) not in moved:
            new = value.detach().to(device)
            if isinstance(value, nn.Parameter):
                new = nn.Parameter(new, requires_grad=value.requires_grad)
            moved[id(value)] = (value, new)
        set_attr_value(gm, target, moved[id(value)][1])

    def swap(value: Any) -> Any:
        return device if isinstance(value, torch.device) else value

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = fx.node.map_aggregate(node.args, swap)
            node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()
    return gm
