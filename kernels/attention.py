"""The KV cache and causal grouped-query attention over it.

Cache layout per layer: (kv_heads, positions, head_dim), so one head's keys are contiguous
and a query streams through them in order. Query head h reads KV head h // (heads / kv_heads):
grouped-query heads share the cache without copies.
"""
import math

import numpy as np
from numba import njit, prange


def store_kv(k, v, k_cache, v_cache, start_pos):
    """Write k, v of shape (tokens, kv_heads, head_dim) at positions start_pos... of one layer."""
    n_tokens = k.shape[0]
    k_cache[:, start_pos:start_pos + n_tokens] = k.transpose(1, 0, 2)
    v_cache[:, start_pos:start_pos + n_tokens] = v.transpose(1, 0, 2)


@njit(parallel=True, fastmath=True, cache=True)
def attention(q, k_cache, v_cache, start_pos, out):
    """Causal attention for queries q (tokens, heads, head_dim) at positions start_pos + t.

    Query t sees cache positions 0 .. start_pos + t. Softmax is computed with the running
    maximum subtracted, in float32, like the reference implementation.
    """
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for item in prange(n_tokens * n_heads):
        t = item // n_heads
        h = item % n_heads
        kv = h // group
        n_keys = start_pos + t + 1
        scores = np.empty(n_keys, np.float32)
        best = np.float32(-np.inf)
        for p in range(n_keys):
            s = np.float32(0.0)
            for i in range(head_dim):
                s += q[t, h, i] * k_cache[kv, p, i]
            s *= scale
            scores[p] = s
            best = max(best, s)
        total = np.float32(0.0)
        for p in range(n_keys):
            e = np.exp(scores[p] - best)
            scores[p] = e
            total += e
        acc = np.zeros(head_dim, np.float32)
        for p in range(n_keys):
            w = scores[p]
            for i in range(head_dim):
                acc[i] += w * v_cache[kv, p, i]
        inv_total = np.float32(1.0) / total
        for i in range(head_dim):
            out[t, h, i] = acc[i] * inv_total
