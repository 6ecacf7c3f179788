"""RoPE inverse-frequency tables for every rope_type the supported families use.

Tables are computed in float32 with the same roundings transformers applies (an fp32 power, then an fp32
reciprocal), so positions far into the context rotate by the same angles as the reference model.
"""
from __future__ import annotations

import math

import numpy as np

from .hf import ConfigError

f32 = np.float32


def _base_powers(theta: float, dim: int, count: int | None = None) -> np.ndarray:
    """theta ** (2j / dim) for j < count: an fp32 exponent, the power correctly rounded to fp32 (as torch's
    powf nearly always is; numpy's fp32 power is off by an ulp far more often)."""
    n = dim // 2 if count is None else count
    exps = np.arange(0, 2 * n, 2, dtype=np.int64).astype(f32) / f32(dim)
    return np.power(np.float64(theta), exps.astype(np.float64)).astype(f32)


def inv_freq(params: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2], attention scaling applied to cos and sin)."""
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params["rope_theta"])
    d = head_dim
    if kind == "default":
        inv = f32(1) / _base_powers(theta, d)
        if params.get("freq_factors") is not None:
            # llama.cpp's rope_freqs: one divisor per frequency (how GGUF files carry LLaMA-3's scaling)
            factors = np.asarray(params["freq_factors"], dtype=f32)
            if factors.shape != inv.shape:
                raise ConfigError(f"{factors.size} RoPE frequency factors for head_dim {d}")
            inv = inv / factors
        return inv, 1.0
    if kind == "linear":
        return (f32(1) / _base_powers(theta, d)) / f32(params["factor"]), 1.0
    if kind == "proportional":
        n_rot = int(float(params.get("partial_rotary_factor", 1.0)) * d // 2)
        inv = np.zeros(d // 2, dtype=f32)
        inv[:n_rot] = f32(1) / _base_powers(theta, d, n_rot)
        return inv / f32(params.get("factor", 1.0)), 1.0
    if kind == "llama3":
        inv = f32(1) / _base_powers(theta, d)
        factor, lo, hi = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        l0 = float(params["original_max_position_embeddings"])
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > l0 / lo, inv / f32(factor), inv)
        smooth = (f32(l0) / wavelen - f32(lo)) / f32(hi - lo)
        smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
        medium = ~(wavelen < l0 / hi) & ~(wavelen > l0 / lo)
        return np.where(medium, smoothed, scaled).astype(f32), 1.0
    if kind == "yarn":
        factor = float(params["factor"])
        l0 = float(params["original_max_position_embeddings"])
        attn = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attn is None:
            attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
                else get_mscale(factor)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def corr(n):
            return d * math.log(l0 / (n * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = corr(beta_fast), corr(beta_slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1).astype(f32)
        extrapolation = f32(1) - ramp
        pf = _base_powers(theta, d)
        inv = (f32(1) / (f32(factor) * pf)) * (f32(1) - extrapolation) + (f32(1) / pf) * extrapolation
        return inv.astype(f32), float(attn)
    raise ConfigError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3, yarn, proportional)")


def hf_rope_params(cfg: dict) -> dict:
    """The rope dict of a Llama/Qwen/Mistral config, legacy (`rope_scaling`) or v5 (`rope_parameters`) form."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.setdefault("rope_theta", cfg.get("rope_theta") or 10000.0)
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    if params["rope_theta"] is None:
        params["rope_theta"] = 10000.0
    return params
