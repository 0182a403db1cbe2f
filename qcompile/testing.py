"""Tiny random Hugging Face causal LMs (and a byte tokenizer) for fast tests.

Every family is a 2-layer model with 4 query heads and 2 key/value heads (GQA), vocabulary 256
and intermediate size 160, small enough that capturing one takes about a second. Weights are
drawn from ``seed`` (the global RNG is left untouched); norm weights and biases are perturbed
away from their initial constants so that passes folding them see non-trivial values.

Families and what each exercises:

* ``llama``: the plain pre-norm RMSNorm/SwiGLU/RoPE block, hidden 64.
* ``llama-tied``: as ``llama`` with ``tie_word_embeddings=True`` (lm_head shares the embedding).
* ``mistral``: sliding-window attention (window 16, so longer inputs hit the band mask).
* ``qwen2``: q/k/v biases; hidden 96 (head_dim 24, not a power of two).
* ``phi3``: fused ``qkv_proj`` and ``gate_up_proj`` linears; hidden 96.
* ``gemma2``: post-attention/post-MLP norms, ``(1 + w)`` RMSNorm, scaled embeddings, GeGLU,
  attention and final logit soft-capping, alternating sliding/full layers. It uses eager
  attention because transformers has no SDPA path for it (soft-capping).
* ``gemma3``: Gemma 3 text model: as gemma2 without soft-capping, plus q/k RMSNorm; SDPA.
* ``phi``: Phi-1/2: LayerNorm with bias, parallel attention + GELU MLP reading one norm,
  biases on every linear (lm_head too), partial rotary.

All families export with a dynamic sequence length under transformers 5.x and torch 2.13.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "ByteTokenizer", "assert_within_ulp", "fp8_rows", "tiny_config",
           "tiny_model"]

FAMILIES: list[str] = [
    "llama", "llama-tied", "mistral", "qwen2", "phi3", "gemma2", "gemma3", "phi",
]

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


def tiny_config(family: str) -> Any:
    """Return the transformers config of a tiny ``family`` model (see module docstring).

    Raises:
        ValueError: ``family`` is not in :data:`FAMILIES`.
    """
    import transformers as tf

    c = dict(_COMMON)
    if family == "llama":
        return tf.LlamaConfig(**c)
    if family == "llama-tied":
        return tf.LlamaConfig(**{**c, "tie_word_embeddings": True})
    if family == "mistral":
        return tf.MistralConfig(**c, sliding_window=16)
    if family == "qwen2":
        return tf.Qwen2Config(**{**c, "hidden_size": 96})
    if family == "phi3":
        return tf.Phi3Config(**{**c, "hidden_size": 96})
    if family == "gemma2":
        return tf.Gemma2Config(
            **c, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **c, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == "phi":
        return tf.PhiConfig(**c)
    raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """Build a tiny randomly initialised causal LM in eval mode, float32, on the CPU.

    Args:
        family: One of :data:`FAMILIES`.
        seed: Seed of the weights; the same seed gives the same weights.

    Returns:
        A ``transformers`` ``*ForCausalLM`` model.

    Raises:
        ValueError: ``family`` is not in :data:`FAMILIES`.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    attn = "eager" if family == "gemma2" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=torch.float32
        )
        # Larger-than-default weights give logits with some spread, so numeric checks bite.
        std = config.hidden_size**-0.5
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
                elif "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))  # around 1 (or 0 for 1+w norms)
                else:
                    p.normal_(0.0, 0.1)  # biases
    return model.eval()


class ByteTokenizer:
    """A UTF-8 byte tokenizer (vocabulary 256) with the slice of the HF API qcompile uses."""

    vocab_size = 256
    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Return the UTF-8 bytes of ``text``, after a BOS byte if ``add_special_tokens``."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: list[int]) -> str:
        """Decode byte ids back to text (invalid UTF-8 is replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


_MBITS = {torch.bfloat16: 7, torch.float16: 10}


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 E4M3 of a 2-D ``x``: absmax / 448 scales ``[M, 1]`` and torch's (RNE) cast."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x / scale).to(torch.float8_e4m3fn), scale


#: Error bound of sm_90 FP8 MMA accumulation per promotion interval (32 products: one WGMMA
#: instruction), relative to the sum of the absolute products: the instruction aligns its
#: products to the largest and keeps about 14 significant bits. Measured on an H100
#: (benchmarks/fp8_accuracy.py, K = 4096): 6.1e-6 promoted every instruction, 5.7e-4 for the
#: whole sum in fast accumulation (128 intervals; bound 7.8e-3). The interpreter is exact.
FP8_MMA_REL = 2.0**-14


def fp8_mma_slack(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor,
                  w_scale: torch.Tensor, fast: bool = True) -> torch.Tensor | None:
    """Per-output extra tolerance of an FP8 tensor-core product ``(a @ w.T) * a_scale * w_scale``
    on CUDA: :data:`FP8_MMA_REL` times the same product of absolute values, once per 32 of K
    with fast accumulation (the default), once with promoted sums; None off CUDA (the
    interpreter's products and sums are fp32)."""
    if a.device.type != "cuda":
        return None
    mag = a.float().abs().cpu() @ w.float().abs().cpu().T
    intervals = -(-a.shape[1] // 32) if fast else 1
    return intervals * FP8_MMA_REL * mag * a_scale.float().abs().cpu().reshape(-1, 1) * (
        w_scale.float().abs().cpu().reshape(1, -1))


def assert_within_ulp(out: torch.Tensor, ref: torch.Tensor,
                      extra: torch.Tensor | None = None) -> None:
    """Assert a kernel output matches its fp32 reference.

    Within 1e-5 of the output's absmax for fp32 (accumulation order); for bf16/fp16 also one
    ulp of the output dtype (the final rounding: RNE on CUDA, truncation under the Triton
    interpreter). ``extra`` adds a per-output bound (e.g. :func:`fp8_mma_slack`).
    """
    assert out.shape == ref.shape
    mbits = _MBITS.get(out.dtype)
    out, ref = out.float().cpu(), ref.float().cpu()
    err = (out - ref).abs()
    slack = 1e-5 * float(ref.abs().max().clamp(min=1e-30))
    bound = torch.full_like(ref, slack) if extra is None else slack + extra.float().cpu()
    if mbits is not None:
        _, e = torch.frexp(ref)
        bound = bound + torch.ldexp(torch.ones_like(ref), (e - 1 - mbits).float())
    bad = err > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} outputs off by more than "
        f"{'one ulp + ' if mbits is not None else ''}{slack:.3g}"
        f"{' + the MMA bound' if extra is not None else ''}; worst excess "
        f"{float((err - bound).max()):.4g} (error {float(err.max()):.4g})")
