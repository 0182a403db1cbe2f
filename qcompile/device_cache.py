"""Long-lived CUDA tensors (caches) allocated outside CUDA-graph memory pools."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["outside_graph_pools"]

T = TypeVar("T")


def outside_graph_pools(make: Callable[[], T], device: torch.device | str) -> T:
    """Run ``make()``, which builds tensors a cache keeps for the process, so that their CUDA
    memory does not come from a CUDA-graph memory pool.

    Inductor's cudagraph trees run a compiled function's first (warm-up) call with every
    allocation of the calling thread routed to the graph pool. A tensor a cache keeps from that
    call is not among the outputs the tree tracks, and a later recording may hand its memory
    to another tensor: the cached table would be silently overwritten. Allocations made on
    another thread go to the ordinary pool, so on CUDA ``make`` runs on a short-lived worker
    thread, which also waits for its copies to land. Elsewhere it runs here.

    Args:
        make: Builds and returns the tensors (on ``device``).
        device: Where they live.

    Returns:
        What ``make`` returns.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return make()

    def work() -> T:
        with torch.cuda.device(dev):
            out = make()
            torch.cuda.current_stream(dev).synchronize()
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()
