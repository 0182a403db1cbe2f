"""Remove dead nodes, merge duplicate attribute reads, drop attributes nothing reads."""

from __future__ import annotations

import logging

import torch
import torch.fx

from qcompile.graph import delete_attr
from qcompile.pass_base import Pass, PassResult
from qcompile.registry import register_pass

__all__ = ["CleanupPass"]

log = logging.getLogger(__name__)


@register_pass
class CleanupPass(Pass):
    """Tidy a graph without changing what it computes.

    Rules:
        1. Several ``get_attr`` nodes with one target become the first of them.
        2. Nodes whose results nothing uses are removed, unless they have side effects
           (fx's purity rules: placeholders, outputs and impure calls stay).
        3. Parameters and buffers that no ``get_attr`` reads are deleted from the module,
           freeing their memory.
        4. Nothing to do: ``modified`` is False and the graph is untouched.
    """

    name = "cleanup"
    summary = "dead code, duplicate get_attr, unused parameters/buffers"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        merged = self._merge_get_attrs(gm)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        dead = before - len(gm.graph.nodes)
        dropped, freed = self._drop_unread(gm)
        modified = bool(merged or dead or dropped)
        if modified:
            gm.graph.lint()
            gm.recompile()
        facts = {"get_attr_merged": merged, "dead_nodes": dead, "attrs_dropped": dropped,
                 "bytes_freed": freed}
        return PassResult(gm, modified, facts)

    @staticmethod
    def _merge_get_attrs(gm: torch.fx.GraphModule) -> int:
        first: dict[str, torch.fx.Node] = {}
        merged = 0
        for node in list(gm.graph.nodes):
            if node.op != "get_attr":
                continue
            if node.target in first:
                node.replace_all_uses_with(first[node.target])
                gm.graph.erase_node(node)
                merged += 1
            else:
                first[node.target] = node
        return merged

    @staticmethod
    def _drop_unread(gm: torch.fx.GraphModule) -> tuple[int, int]:
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        named = list(gm.named_parameters(remove_duplicate=False))
        named += list(gm.named_buffers(remove_duplicate=False))

        def kept(name: str) -> bool:
            return name in read or (name.rsplit(".", 1)[0] if "." in name else "") in called

        # A tensor shared under several names (tied weights) frees memory only if no kept
        # name still holds it.
        kept_storage = {t.untyped_storage().data_ptr() for name, t in named if kept(name)}
        dropped = freed = 0
        freed_storage: set[int] = set()
        for name, t in named:
            if kept(name):
                continue
            delete_attr(gm, name)
            log.debug("cleanup: dropped %s", name)
            dropped += 1
            ptr = t.untyped_storage().data_ptr()
            if ptr not in kept_storage and ptr not in freed_storage:
                freed_storage.add(ptr)
                freed += t.untyped_storage().nbytes()
        return dropped, freed
