"""Run an exported model with ONNX Runtime: logits, and greedy generation with the KV cache."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["OnnxLM", "greedy_reference"]


class OnnxLM:
    """An ONNX Runtime CPU session over a qcompile export.

    Calling it maps int64 ``input_ids [batch, seq]`` to float32 logits (a torch tensor), so
    it plugs into :func:`qcompile.evaluate.perplexity`.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (None: ORT's default).
        optimize: ORT graph optimizations (``ORT_ENABLE_ALL``); False disables them.
        dq_accuracy_level: ``accuracy_level`` of the MatMulNBits ORT makes when it fuses a
            blocked INT4 DequantizeLinear into the following MatMul (ORT's default is 4,
            int8 compute; 0 keeps fp32).
        disabled_optimizers: ORT optimizers to skip, e.g. ``["ConstantFolding"]`` to keep
            weight dequantization in every run instead of folding it at load.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 optimize: bool = True, dq_accuracy_level: int | None = None,
                 disabled_optimizers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if dq_accuracy_level is not None:
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                          str(dq_accuracy_level))
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=disabled_optimizers or None)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = props
        kv = json.loads(props.get("qcompile.kv_cache", "null"))
        self.kv_layers = int(kv["layers"]) if kv else 0
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-length past key/values for a first step."""
        feeds = {}
        for inp in self.past:
            _, heads, _, dim = inp.shape
            feeds[inp.name] = np.zeros((batch, int(heads), 0, int(dim)), dtype=np.float32)
        return feeds

    def run(self, input_ids: np.ndarray, cache: dict[str, np.ndarray] | None = None
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits and the next cache (``{}`` for exports without one)."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        if self.past:
            feeds.update(cache if cache is not None else self.empty_cache(input_ids.shape[0]))
        outs = self.session.run(None, feeds)
        nxt = {name.replace("present.", "past_key_values."): v
               for name, v in zip(self.outputs[1:], outs[1:], strict=True)}
        return outs[0], nxt

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.run(input_ids.detach().cpu().numpy())
        return torch.from_numpy(logits)

    def generate(self, input_ids: list[int] | np.ndarray, max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy generation of one sequence; returns the new token ids.

        With a KV-cache export, the prompt runs once and each new token is one step of
        length 1; without one, the whole sequence is recomputed every step.
        """
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        new: list[int] = []
        cache: dict[str, np.ndarray] | None = None
        step = ids
        for _ in range(max_new_tokens):
            if self.past:
                logits, cache = self.run(step, cache)
            else:
                logits, _ = self.run(np.concatenate([ids, np.array([new], np.int64)], 1)
                                     if new else ids)
            token = int(np.argmax(logits[0, -1]))
            new.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            step = np.array([[token]], dtype=np.int64)
        return new


def greedy_reference(model_fn: Any, input_ids: list[int], max_new_tokens: int,
                     eos_token_id: int | None = None) -> list[int]:
    """Greedy generation by recomputing the full sequence with ``model_fn(ids) -> logits``."""
    ids = list(input_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model_fn(torch.tensor([ids + new], dtype=torch.long))
        token = int(torch.argmax(logits[0, -1]))
        new.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
    return new
