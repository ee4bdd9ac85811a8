"""Element-wise and per-row kernels of the transformer block: RMSNorm, rotary embeddings, SwiGLU."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]**2) + eps) * weight, for x of shape (tokens, dim)."""
    n_tokens, dim = x.shape
    for t in prange(n_tokens):
        sum_sq = np.float32(0.0)
        for j in range(dim):
            sum_sq += x[t, j] * x[t, j]
        inv_rms = np.float32(1.0) / np.sqrt(sum_sq / np.float32(dim) + np.float32(eps))
        for j in range(dim):
            out[t, j] = weight[j] * (x[t, j] * inv_rms)


@njit(parallel=True, fastmath=True, cache=True)
def rope(x, cos, sin, start_pos):
    """Rotate x of shape (tokens, heads, head_dim) in place, token t being at position start_pos + t.

    Hugging Face's "rotate half" layout: dimension i pairs with i + head_dim/2 (not 2i with 2i+1,
    which is what GGUF's llama tensors use after llama.cpp permutes q/k at conversion).
    cos and sin are tables of shape (positions, head_dim/2).
    """
    n_tokens, n_heads, head_dim = x.shape
    half = head_dim // 2
    for t in prange(n_tokens):
        pos = start_pos + t
        for h in range(n_heads):
            for i in range(half):
                a = x[t, h, i]
                b = x[t, h, i + half]
                x[t, h, i] = a * cos[pos, i] - b * sin[pos, i]
                x[t, h, i + half] = b * cos[pos, i] + a * sin[pos, i]


@njit(parallel=True, fastmath=True, cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, the gated activation of the Llama/Qwen MLP."""
    n_tokens, width = gate.shape
    for t in prange(n_tokens):
        for j in range(width):
            g = gate[t, j]
            out[t, j] = g / (np.float32(1.0) + np.exp(-g)) * up[t, j]
