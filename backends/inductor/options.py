"""Options of the ``qcompile`` torch.compile backend: the ``options=`` dict, checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.errors import PipelineError

__all__ = ["BackendOptionError", "BackendOptions", "parse_options"]


class BackendOptionError(PipelineError):
    """An option given to the backend is unknown or has a value it cannot use."""


@dataclass(frozen=True)
class BackendOptions:
    """What ``torch.compile(model, backend="qcompile", options={...})`` accepts.

    Exactly one of ``recipe``, ``pipeline`` or ``artifact`` says how weights are quantized.

    Attributes:
        recipe: Name of a recipe (``qcompile recipes`` lists them), e.g. ``w4-afpq``.
        pipeline: Pipeline text, e.g. ``quantize{w=fp4_e2m1/g128/asym},cleanup``.
        artifact: Directory written by ``qcompile quantize`` / ``qcompile.save_quantized``;
            its quantized weights are matched to the model's parameters by name. Recipes that
            need calibration or error compensation (SmoothQuant, GPTQ) come this way.
        free_weights: After quantizing, release the storage of full-precision weights that
            no compiled graph reads any more (the eager model can then no longer run them).
        inductor: Compile the quantized graph with Inductor (True) or run it eagerly with the
            ops' reference implementations (False; for debugging numerics).
        mode: Inductor mode (``default``, ``reduce-overhead``, ``max-autotune``, ...); also
            taken from ``torch.compile(mode=...)``.
        lower: ``auto`` runs the ``lower-triton`` pass on CUDA graphs; ``always`` on every
            graph (on the CPU the fused ops run their exact references: a numerics check);
            ``none`` never lowers.
        verify: Check the graph after every pass (fx lint, attributes exist).
        fuse_linears: Run ``fuse-linears`` on every graph before lowering: the quantized
            linears that read one input (q/k/v, gate/up) become one wider linear, one kernel
            launch instead of several. The cached per-weight tensors become views of the
            fused ones, so no weight is held twice.
        fp32_accumulate: Lowered FP8 and W4A8 linears add each MMA instruction's products
            into fp32 (``lower-triton{fp32_accumulate=true}``): about 3x more accurate than
            cuBLAS's default mode, 0.55-0.6x the speed on an H100. Off: the sums stay in the
            FP8 MMA's accumulator (cuBLAS's fast mode).
        decode_fusion: In one-row (decode) graphs, lowered W4A16 linears take in the RMSNorm
            or SiLU gate in front of them and the residual add behind them
            (``lower-triton{decode_fusion=...}``): three element-wise launches fewer per
            Llama layer and token.
        decode_attention: In one-row graphs, attention over a GQA KV cache becomes one
            ``decode_attention`` op reading each kv head once (``lower-triton{attention=...}``)
            instead of copies of the cache repeated per query head and an SDPA.
    """

    recipe: str | None = None
    pipeline: str | None = None
    artifact: str | None = None
    free_weights: bool = False
    inductor: bool = True
    mode: str | None = None
    lower: str = "auto"
    verify: bool = True
    fuse_linears: bool = True
    fp32_accumulate: bool = False
    decode_fusion: bool = True
    decode_attention: bool = True

    def key(self) -> tuple:
        """Hashable identity: backends with equal keys share their quantized weights."""
        return dataclasses.astuple(self)


_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (str,),
    "pipeline": (str,),
    "artifact": (str, Path),
    "free_weights": (bool,),
    "inductor": (bool,),
    "mode": (str,),
    "lower": (str,),
    "verify": (bool,),
    "fuse_linears": (bool,),
    "fp32_accumulate": (bool,),
    "decode_fusion": (bool,),
    "decode_attention": (bool,),
}
_LOWER = ("auto", "always", "none")


def parse_options(options: dict[str, Any] | None, mode: str | None = None) -> BackendOptions:
    """Check the ``options=`` dict and turn it into :class:`BackendOptions`.

    Args:
        options: The dict given to ``torch.compile(..., options=...)`` (may be None).
        mode: ``torch.compile``'s ``mode`` argument, if any.

    Raises:
        BackendOptionError: Unknown keys (all named), wrong value types, not exactly one of
            recipe / pipeline / artifact, or an artifact path that is not an artifact.
        PipelineError: An unknown recipe or malformed pipeline text.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(_TYPES))
    if unknown:
        raise BackendOptionError(
            f"unknown qcompile backend option(s): {', '.join(map(repr, unknown))}; valid "
            f"options: {', '.join(_TYPES)}"
        )
    for key, value in options.items():
        if value is not None and not isinstance(value, _TYPES[key]):
            names = " or ".join(t.__name__ for t in _TYPES[key])
            raise BackendOptionError(
                f"qcompile backend option {key!r} must be {names}, got {type(value).__name__} "
                f"{value!r}"
            )
    if mode is not None and options.get("mode") not in (None, mode):
        raise BackendOptionError(
            f"mode given twice with different values: torch.compile(mode={mode!r}) and "
            f"options['mode']={options['mode']!r}"
        )
    if mode is not None:
        options["mode"] = mode
    given = [k for k in ("recipe", "pipeline", "artifact") if options.get(k) is not None]
    if len(given) != 1:
        which = ", ".join(given) if given else "none"
        raise BackendOptionError(
            "the qcompile backend needs exactly one of options 'recipe', 'pipeline' or "
            f"'artifact' (got: {which}); e.g. options={{'recipe': 'w4-afpq'}}"
        )
    if options.get("lower", "auto") not in _LOWER:
        raise BackendOptionError(
            f"option 'lower' must be one of {', '.join(_LOWER)}, got {options['lower']!r}"
        )
    if options.get("artifact") is not None:
        from qcompile.serialize import is_artifact

        path = Path(options["artifact"]).expanduser().resolve()
        if not is_artifact(path):
            raise BackendOptionError(
                f"option 'artifact': {path} is not a qcompile artifact directory (no "
                "qcompile.json); write one with `qcompile quantize` or qcompile.save_quantized"
            )
        options["artifact"] = str(path)
    opts = BackendOptions(**options)
    if opts.recipe is not None:
        from qcompile.recipes import get_recipe

        get_recipe(opts.recipe)  # PipelineError naming the known recipes
    if opts.pipeline is not None:
        from qcompile.pipeline import parse_pipeline

        object.__setattr__(opts, "pipeline", str(parse_pipeline(opts.pipeline)))
    return opts
