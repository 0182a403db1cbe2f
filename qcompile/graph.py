"""Small helpers over aten-level fx graphs: attributes by dotted name, linear nodes."""

from __future__ import annotations

import torch
import torch.fx

__all__ = [
    "delete_attr",
    "get_attr_value",
    "has_attr",
    "is_linear",
    "linear_nodes",
    "propagate_fake",
    "set_attr_value",
    "unique_attr_name",
]


def _owner(gm: torch.nn.Module, target: str, create: bool = False) -> tuple[torch.nn.Module, str]:
    *path, leaf = target.split(".")
    mod = gm
    for atom in path:
        sub = getattr(mod, atom, None)
        if sub is None:
            if not create:
                raise AttributeError(f"graph module has no attribute {target!r}")
            sub = torch.nn.Module()
            mod.add_module(atom, sub)
        if not isinstance(sub, torch.nn.Module):
            raise AttributeError(f"{atom!r} in {target!r} is not a module")
        mod = sub
    return mod, leaf


def get_attr_value(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node with this target reads.

    Raises:
        AttributeError: No such attribute.
    """
    mod, leaf = _owner(gm, target)
    value = getattr(mod, leaf, None)
    if not isinstance(value, torch.Tensor):
        raise AttributeError(f"graph module has no tensor attribute {target!r}")
    return value


def has_attr(gm: torch.nn.Module, target: str) -> bool:
    """Whether a dotted attribute exists."""
    try:
        get_attr_value(gm, target)
    except AttributeError:
        return False
    return True


def set_attr_value(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Bind a dotted name to ``value``, creating submodules as needed.

    A parameter stays a parameter (``value`` is wrapped, without grad), anything else is
    stored as a buffer. The old tensor is replaced, never modified: captured graphs share
    tensors with the eager model and with tied partners.
    """
    mod, leaf = _owner(gm, target, create=True)
    old = getattr(mod, leaf, None)
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    if isinstance(old, torch.nn.Parameter) and not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)


def delete_attr(gm: torch.nn.Module, target: str) -> None:
    """Remove a dotted attribute (parameter or buffer)."""
    mod, leaf = _owner(gm, target)
    delattr(mod, leaf)


def unique_attr_name(gm: torch.nn.Module, base: str) -> str:
    """``base`` if free, else ``base_1``, ``base_2``, ..."""
    name, i = base, 0
    while has_attr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def is_linear(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an ``aten.linear`` call."""
    return node.op == "call_function" and node.target is torch.ops.aten.linear.default


def linear_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Every ``aten.linear`` node whose weight is read straight from an attribute."""
    out = []
    for node in gm.graph.nodes:
        if is_linear(node) and isinstance(node.args[1], torch.fx.Node):
            if node.args[1].op == "get_attr":
                out.append(node)
    return out


def propagate_fake(node: torch.fx.Node) -> None:
    """Give a new call node fake ``val`` metadata like captured nodes have, by running its
    target on its inputs' fake values (nothing when an input has none)."""
    vals = []
    mode = None
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val")
            if v is None:
                return
            mode = mode or getattr(v, "fake_mode", None)
            vals.append(v)
        else:
            vals.append(a)
    if mode is None:
        return
    with mode:
        node.meta["val"] = node.target(*vals)
