"""Element-wise and per-row kernels of the transformer block: RMSNorm, rotary embeddings, SwiGLU,
and the exponential that SwiGLU and the attention's softmax use."""
import numpy as np
from numba import njit

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)
from .bits import f32_from_bits

# exp(x) = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, the first exact in
# few bits so that n times it is exact), e^r by Cephes' expf polynomial on |r| <= ln(2) / 2
LOG2_E = np.float32(1.44269504088896341)
LN2_HIGH, LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)
P0, P1, P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
P3, P4, P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
EXP_LOWEST, EXP_HIGHEST = np.float32(-87.3), np.float32(88.3)   # so that 2^n is a normal float32


@njit(inline="always")
def exp_f32(x):
    """e^x in float32, in plain arithmetic that LLVM vectorizes (relative error below 3e-7 in the
    fast-math kernels that use it, tests/test_quant_kernels.py). numba's np.exp is a scalar call
    into the C library per value (no vector math library here): SwiGLU's 8960 exponentials per
    layer took longer than reading a weight matrix. Inputs are clamped to [-87.3, 88.3]; below,
    e^x comes out as 1.3e-38 instead of something smaller, which is nothing next to softmax's
    largest term (1) or to SwiGLU's 1 + e^-g."""
    x = min(max(x, EXP_LOWEST), EXP_HIGHEST)
    n = np.floor(x * LOG2_E + np.float32(0.5))
    r = x - n * LN2_HIGH - n * LN2_LOW
    p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
    two_to_n = f32_from_bits(np.int32((np.int32(n) + 127) << 23))   # the exponent bits of 2^n
    return (p * r * r + r + np.float32(1.0)) * two_to_n


# RMSNorm, rope and SwiGLU run every row count in one plain loop. Their rows are short work
# even for a prompt (microseconds each: under 1 % of a prompt's time), where a parallel region
# would cost more to launch for a decode step's one row, and a parallel kernel takes seconds
# more to compile on a first run (numba compiles its loop body a second time). And one kernel
# for every row count rounds the same in every row: RMSNorm's sum of squares is a reduction
# whose order LLVM picks per compiled loop, and a second kernel for one row rounded differently
# (4.8e-7), which the int8 rounding after it turned into different tokens for the same sequence
# alone and in a server's batch.

# error_model="numpy" here and in attention: a division by zero gives infinity, which the forward
# pass's check for non-finite values reports with the weight that caused it, not a ZeroDivisionError.
@njit(fastmath=True, error_model="numpy", cache=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]**2) + eps) * weight, for x of shape (tokens, dim)."""
    dim = x.shape[1]
    for t in range(x.shape[0]):
        sum_sq = np.float32(0.0)
        for j in range(dim):
            sum_sq += x[t, j] * x[t, j]
        inv_rms = np.float32(1.0) / np.sqrt(sum_sq / np.float32(dim) + np.float32(eps))
        for j in range(dim):
            out[t, j] = weight[j] * (x[t, j] * inv_rms)


@njit(fastmath=True, cache=True)
def rope(x, cos, sin, positions, interleaved):
    """Rotate x of shape (tokens, heads, head_dim) in place, token t being at position positions[t]
    (int64, each below len(cos): the caller checks).

    Hugging Face's "rotate half" layout pairs dimension i with i + head_dim/2. GGUF's llama
    tensors (q/k rows permuted by llama.cpp's converter) pair 2i with 2i + 1: `interleaved`.
    Both give the same attention scores on the same model. cos and sin: (positions, head_dim/2).
    """
    n_heads, head_dim = x.shape[1], x.shape[2]
    half = head_dim // 2
    stride = 1 if interleaved else half   # distance between the two members of a pair
    for t in range(x.shape[0]):
        pos = positions[t]
        for h in range(n_heads):
            for i in range(half):
                first = 2 * i if interleaved else i
                a = x[t, h, first]
                b = x[t, h, first + stride]
                x[t, h, first] = a * cos[pos, i] - b * sin[pos, i]
                x[t, h, first + stride] = b * cos[pos, i] + a * sin[pos, i]


# silu(g) = g / (1 + e^-g) takes e^-g capped at e^80: for gates below -88, 1 / (1 + e^-g) would be
# a denormal float (below 1.2e-38), and x86 cores take a microcode assist for every operation on
# one (a decode row with such gates, as random-weight models have: 65 us instead of 4 on Intel).
# silu(g) is below 1e-32 there either way.
SILU_EXP_CAP = np.float32(80.0)


# error_model="numpy": numba's default raises ZeroDivisionError, and the check it puts before
# every division is a branch that keeps LLVM from vectorizing the loop
@njit(fastmath=True, error_model="numpy", cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, the gated activation of the Llama/Qwen MLP, for (tokens, width)."""
    for t in range(gate.shape[0]):
        for j in range(gate.shape[1]):
            g = gate[t, j]
            out[t, j] = g / (np.float32(1.0) + exp_f32(min(-g, SILU_EXP_CAP))) * up[t, j]
