"""The weight formats: quantizers and decoders bit-exact with the gguf package, kernels against
numpy references (at their integer extremes too), and the machine code of the hot kernels
checked for the SIMD instructions the speed relies on."""
import os
import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from engine.kernels import bits, compiler, layout, quant
from engine.kernels.formats import FORMATS, Weight, matmul

GGML_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
READ_ONLY_FORMATS = [f.name for f in FORMATS.values() if f.packed and f.quantize is None]   # from GGUF files
# |w - dequant(quant(w))| <= bound * max|block|: half a step for q8_0 (max -> 127); for q4_0 the
# signed extreme maps to -8, so the opposite extreme clips at +7: up to a whole step there
ROUND_TRIP_BOUND = {"q8_0": 0.5 / 127, "q4_0": 1 / 8}


def random_weights(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.exp(rng.standard_normal((rows, 1))).astype(np.float32)
    w[0, :32] = 0.0               # an all-zero block (scale 0)
    w[1, :32] = 3.0               # a constant block
    w[2, 5] = 1e4                 # an outlier
    return w


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_quantizer_is_bit_exact_with_gguf(fmt):
    w = random_weights(64, 256)
    ours = FORMATS[fmt].quantize(w)
    ref = quants.quantize(w, GGML_TYPES[fmt])
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_dequantize_is_bit_exact_with_gguf(fmt):
    w = random_weights(48, 320, seed=1)
    blocks = quants.quantize(w, GGML_TYPES[fmt])
    ours = Weight(FORMATS[fmt], w.shape, blocks).dequantize()
    assert np.array_equal(ours, quants.dequantize(blocks, GGML_TYPES[fmt]))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_round_trip_error_bound(fmt):
    w = random_weights(64, 512, seed=2)
    back = Weight.quantize(w, fmt).dequantize()
    block_max = np.abs(w).reshape(64, -1, 32).max(-1, keepdims=True)
    err = np.abs(back - w).reshape(64, -1, 32) / np.maximum(block_max, 1e-30)
    # the fp16 rounding of the scale adds at most 2^-11 relative
    # plus the fp16 rounding of the scale: at most 2^-11 relative, times the largest level
    assert err.max() <= ROUND_TRIP_BOUND[fmt] + 2 ** -11


def reference_matmul(weight: Weight, x: np.ndarray) -> np.ndarray:
    """What the kernels compute, in float64: dequantized weights times quantize-dequantized
    int8 activations."""
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    quant.quantize_activations(x, xq, xd)
    x_back = xq.astype(np.float64).reshape(len(x), -1, 32) * xd[:, :, None]
    return x_back.reshape(x.shape) @ weight.dequantize().astype(np.float64).T


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_kernels_equal_dequantize_then_matmul(fmt, tokens):
    rows, cols = 200, 640   # rows not a multiple of the task size
    w = Weight.quantize(random_weights(rows, cols, seed=3), fmt)
    x = np.random.default_rng(4).standard_normal((tokens, cols)).astype(np.float32)
    out = np.empty((tokens, rows), np.float32)
    matmul(w, x, out)
    ref = reference_matmul(w, x)
    # same arithmetic; float32 accumulation over 20 blocks is the only difference
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    # and the int8 activations keep close to the float product (rows 0-2 hold a zero block,
    # a constant block and a 1e4 outlier that amplifies activation rounding: left out here)
    exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert np.abs(out - exact)[:, 3:].max() <= 0.02 * np.abs(exact[:, 3:]).max()


@pytest.mark.parametrize("fmt", [f.name for f in FORMATS.values() if f.packed])
@pytest.mark.parametrize("rows, cols", [(100, 512), (130, 768)])
def test_packing_keeps_every_byte(fmt, rows, cols):
    """The kernels' interleaved layout is a permutation of the file's blocks: unpacking gives
    back exactly the GGML rows, also for a row count that is not a multiple of the group, with
    rows of 8-byte words or not (Q4_0's 18-byte blocks), scales in planes and quants in quads
    (Q6_K's bytes out of their file order)."""
    f = FORMATS[fmt]
    blocks = random_blocks(fmt, rows, cols, seed=8)
    w = Weight(f, (rows, cols), blocks)
    assert w.data.shape == (-(-rows // 64), cols // f.block_size, quant.ROW_GROUP * f.block_bytes)
    assert np.array_equal(w.file_rows(), blocks)
    assert np.array_equal(w.file_rows(np.array([99, 0, 64])), blocks[[99, 0, 64]])
    positions = layout.byte_positions(f.runs, f.block_bytes)
    second_block = w.data[0, 1]   # 64 rows' second block: the file's bytes block_bytes + k
    for k in range(f.block_bytes):   # lane l's byte k at positions[k, l]: planes or quads
        assert np.array_equal(second_block[positions[k]], blocks[:64, f.block_bytes + k])
    assert np.array_equal(np.sort(positions.ravel()), np.arange(64 * f.block_bytes))   # each packed byte used once
    lookup = Weight(f, (rows, cols), blocks, rows_only=True)   # not packed
    assert lookup.data is blocks and np.array_equal(lookup.file_rows(np.array([5])), blocks[[5]])


def test_quad_in_runs_is_where_the_packing_puts_each_quad():
    """The kernels index a QUADS_IN_RUNS span with layout.quad_in_runs (Q5_K); the packing places
    it by byte_positions: the two agree for every run of lanes and quad of a span."""
    runs = ((0, 2, layout.PLANES), (2, 2 + 2 * 4 * layout.RUN_QUADS, layout.QUADS_IN_RUNS))   # two spans
    positions = layout.byte_positions(runs, 2 + 2 * 4 * layout.RUN_QUADS)
    span_start = 2 * 64
    for span in range(2):
        for j in range(layout.RUN_QUADS):
            k = 2 + 4 * (span * layout.RUN_QUADS + j)   # the quad's first byte in the block
            for lanes in range(0, 64, layout.RUN_LANES):
                at = span_start + span * 4 * layout.RUN_QUADS * 64 + layout.quad_in_runs(lanes, j)
                run = np.arange(lanes, lanes + layout.RUN_LANES)
                assert np.array_equal(positions[k, run], at + 4 * (run - lanes))   # 4 bytes a lane, side by side
                assert np.array_equal(positions[k + 3, run], at + 4 * (run - lanes) + 3)


def test_activation_quantization():
    x = np.random.default_rng(5).standard_normal((3, 96)).astype(np.float32)
    x[1, :32] = 0
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((3, 3), np.float32)
    quant.quantize_activations(x, xq, xd)
    assert np.all(xd[1, 0] == 0) and np.all(xq[1, :32] == 0)
    back = xq.reshape(3, 3, 32) * xd[:, :, None]
    assert np.abs(back.reshape(3, 96) - x).max() <= 0.5 * xd.max() * 1.0001
    assert np.abs(xq).max() == 127
    again, again_d, xs = np.empty(x.shape, np.int8), np.empty((3, 3), np.float32), np.empty((3, 6), np.int32)
    quant.quantize_for_matmul(x, again, again_d, xs)   # the same values, and sums of 16
    assert np.array_equal(again, xq) and np.array_equal(again_d, xd)
    assert np.array_equal(xs, xq.reshape(3, 6, 16).astype(np.int64).sum(axis=2))


def test_float_formats_round_trip():
    w = random_weights(16, 64)
    assert np.array_equal(Weight.quantize(w, "f32").dequantize(), w)
    assert np.array_equal(Weight.quantize(w, "f16").dequantize(), w.astype(np.float16).astype(np.float32))
    bf = Weight.quantize(w, "bf16").dequantize()
    assert np.abs(bf - w).max() <= np.abs(w).max() * 2 ** -8


def test_weight_storage_is_validated():
    with pytest.raises(ValueError, match="q4_0 storage for shape"):
        Weight(FORMATS["q4_0"], (4, 64), np.zeros((4, 35), np.uint8))
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        Weight(FORMATS["q8_0"], (4, 40), np.zeros((4, 34), np.uint8))


# --- machine code --------------------------------------------------------------------------

# a SIMD integer multiply on 256/512-bit registers: 16/32-bit lanes (or the multiply-add and VNNI forms)
INT_SIMD_MULTIPLY = r"\b(vpmullw|vpmulld|vpmaddwd|vpdpwssd|vpdpbusd|vpmaddubsw)\s+%[yz]mm"


def fresh_asm(kernel, *args) -> str:
    """Machine code of a kernel compiled anew with its own options (cached code cannot be inspected)."""
    import numba
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = numba.njit(**options)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_asm(fresh.signatures[0])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_hot_kernels_use_simd_integer_dot_products(fmt):
    w = Weight.quantize(random_weights(32, 64), fmt)
    xq, xd = np.ones((1, 64), np.int8), np.ones((1, 2), np.float32)
    kernel = {"q8_0": quant.matmul_q8_0, "q4_0": quant.matmul_q4_0}[fmt]
    asm = fresh_asm(kernel, w.data, xq, xd, np.full((1, 4), 16, np.int32), np.empty((1, 32), np.float32))
    assert re.search(INT_SIMD_MULTIPLY, asm), f"{fmt} kernel lost its vectorized integer dot product"
    if fmt == "q8_0" and bits._host_has_vnni():   # one vpdpbusd per 32 weight bytes
        assert re.search(r"\bvpdpbusd\b", asm), "Q8_0 kernel does not use VNNI on a CPU that has it"
    # numba's default int64 arithmetic would show up as 64-bit lane multiplies or conversions
    assert not re.search(r"\b(vpmuldq|vpmullq|vcvtqq2ps)\b", asm)
    if compiler.SOFTWARE_PREFETCH or fmt == "q4_0":   # Q4_0 prefetches everywhere
        assert re.search(r"\bprefetcht0\b", asm), f"{fmt} kernel lost its prefetch hints"
    else:
        assert not re.search(r"\bprefetch", asm), f"{fmt} kernel prefetches on a CPU where that is slower"


ALWAYS_PREFETCH = ("q4_1", "q5_0", "q5_1", "iq4_nl", "q6_k")   # the rest only where compiler.SOFTWARE_PREFETCH


@pytest.mark.parametrize("fmt", READ_ONLY_FORMATS)
def test_gguf_format_int8_kernels_use_simd_integer_multiplies(fmt):
    w = Weight(FORMATS[fmt], (64, 256), random_blocks(fmt, 64, 256))
    xq, xd = np.ones((1, 256), np.int8), np.ones((1, 8), np.float32)
    asm = fresh_asm(FORMATS[fmt].int_matmul, w.data, xq, xd, np.full((1, 16), 16, np.int32),
                    np.empty((1, 64), np.float32))
    assert re.search(INT_SIMD_MULTIPLY, asm), f"{fmt} kernel lost its vectorized integer dot product"
    assert not re.search(r"\b(vpmuldq|vpmullq|vcvtqq2ps)\b", asm)
    if fmt not in ("q4_1", "q4_k", "q2_k") and bits._host_has_vnni():   # those keep int16 pair sums
        assert re.search(r"\bvpdpbusd\b", asm), f"{fmt} kernel does not use VNNI on a CPU that has it"
    if fmt.startswith("iq4") and bits._host_has_avx2():
        assert re.search(r"\bvpshufb\s+%ymm", asm), f"{fmt} kernel does not look its values up with a byte shuffle"
    assert bool(re.search(r"\bprefetcht0\b", asm)) == (compiler.SOFTWARE_PREFETCH or fmt in ALWAYS_PREFETCH)


@pytest.mark.parametrize("fmt", [f.name for f in FORMATS.values() if f.tile_matmul is not None])
def test_tile_kernels_use_simd_integer_multiplies_and_fused_multiply_adds(fmt):
    """The kernels for tiles of tokens (layout.TOKEN_TILE): SIMD integer products, no int64
    lanes, and the fused multiply-adds that bits.fma spells out (vfmadd with FMA)."""
    f = FORMATS[fmt]
    w = Weight(f, (64, 256), random_blocks(fmt, 64, 256))
    tokens = layout.TOKEN_TILE
    asm = fresh_asm(f.tile_matmul, w.data, np.ones((tokens, 256), np.int8), np.ones((tokens, 8), np.float32),
                    np.full((tokens, 16), 16, np.int32), np.empty((tokens, 64), np.float32))
    assert re.search(INT_SIMD_MULTIPLY, asm), f"{fmt} tile kernel lost its vectorized integer dot product"
    assert not re.search(r"\b(vpmuldq|vpmullq|vcvtqq2ps)\b", asm)
    if bits._host_has_avx2():   # FMA comes with AVX2 on every x86 CPU that has it
        assert re.search(r"\bvfmadd\w*ps\s+[^\n]*%[yz]mm", asm), f"{fmt} tile kernel lost its vector fused multiply-adds"


def test_float_kernel_uses_fma():
    from engine.kernels.formats import matmul_bf16
    w = Weight.quantize(random_weights(32, 64), "bf16")
    asm = fresh_asm(matmul_bf16, w.data, np.ones((1, 64), np.float32), np.empty((1, 32), np.float32))
    assert re.search(r"\bvfmadd\w*ps\b", asm)


# --- formats read from GGUF files ------------------------------------------------------------

def random_blocks(fmt, rows, cols, seed=0):
    """Random bytes as blocks of `fmt`, with finite fp16 scales, like a real file's."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, f.row_bytes(cols)), dtype=np.uint8)
    blocks = data.reshape(-1, f.block_bytes)
    scales = rng.uniform(-0.05, 0.05, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    for k, offset in enumerate(f.f16_fields):
        blocks[:, offset:offset + 2] = scales[:, 2 * k:2 * k + 2]
    return data


GGUF_TYPES = {name: GGMLQuantizationType[name.upper()] for name in READ_ONLY_FORMATS}


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_gguf_format_decoders_are_bit_exact(fmt):
    data = random_blocks(fmt, 24, 512, seed=7)
    ours = Weight(FORMATS[fmt], (24, 512), data).dequantize()
    ref = quants.dequantize(data, GGUF_TYPES[fmt])
    assert ours.shape == ref.shape and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_gguf_format_matmul_equals_dequantize_then_matmul(fmt):
    blocks = random_blocks(fmt, 40, 512, seed=8)
    w = Weight(FORMATS[fmt], (40, 512), blocks)
    x = np.random.default_rng(9).standard_normal((3, 512)).astype(np.float32)
    out = np.empty((3, 40), np.float32)
    matmul(w, x, out)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T if FORMATS[fmt].int_matmul is None \
        else reference_matmul(w, x)   # the same arithmetic as the kernel (integer activations)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("fmt", [f.name for f in FORMATS.values() if f.packed])
def test_each_token_gets_what_it_gets_alone(fmt):
    """Batch invariance: whatever the number of tokens in a call (tiles of layout.TOKEN_TILE,
    then the rest one by one), each token's row is bit for bit what it is alone, so that a
    server's batched decoding answers each client exactly as one at a time; and 9 tokens (two
    tiles and one more) equal the float64 product of the same integer activations."""
    rows, cols = 130, 512   # rows not a multiple of the 64-row groups
    w = Weight(FORMATS[fmt], (rows, cols), random_blocks(fmt, rows, cols, seed=11))
    x = np.random.default_rng(12).standard_normal((9, cols)).astype(np.float32)
    alone = np.empty((9, rows), np.float32)
    for t in range(9):
        matmul(w, x[t:t + 1], alone[t:t + 1])
    for n in range(2, 10):
        together = np.empty((n, rows), np.float32)
        matmul(w, x[:n], together)
        assert np.array_equal(together.view(np.uint32), alone[:n].view(np.uint32)), f"{n} tokens"
    ref = reference_matmul(w, x)
    assert np.abs(alone - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("fmt", [f.name for f in FORMATS.values() if f.packed])
@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_integer_sums_at_their_extremes(fmt, byte):
    """Every quant and scale byte at its extreme (all bits clear or set: the largest |q|, the
    largest scales and minimums), fp16 scales of 1, activations at the edge of their range (all
    -1: each block's int8 extreme, -127): no integer sum of any kernel may overflow, so the
    kernel equals the float64 product of the decoded weights."""
    f = FORMATS[fmt]
    rows, cols = 64, 512
    blocks = np.full((rows * cols // f.block_size, f.block_bytes), byte, np.uint8)
    for offset in f.f16_fields:
        blocks[:, offset:offset + 2] = [0x00, 0x3C]   # 1.0
    w = Weight(f, (rows, cols), blocks.reshape(rows, -1))
    x = np.full((1, cols), -1.0, np.float32)
    out = np.empty((1, rows), np.float32)
    matmul(w, x, out)
    exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert np.abs(out - exact).max() <= 1e-6 * np.abs(exact).max()


def test_q6_k_integer_sums_at_their_extremes():
    """Q6_K applies its int8 scales in int32: sc * sum (q - 32) x over 16 weights, at the
    extremes q = 0, sc = -128, activations of -127. Every weight is then -128 * -32 = 4096, so
    each output is -4096 * cols; an overflow would be far off."""
    rows, cols = 64, 512
    blocks = np.zeros((rows * cols // 256, 210), np.uint8)
    blocks[:, 192:208] = 0x80                  # the 16 scales: -128
    blocks[:, 208:210] = [0x00, 0x3C]          # d = 1.0
    w = Weight(FORMATS["q6_k"], (rows, cols), blocks.reshape(rows, -1))
    assert np.all(w.dequantize() == 4096)
    out = np.empty((1, rows), np.float32)
    matmul(w, np.full((1, cols), -1.0, np.float32), out)
    assert np.allclose(out, -4096.0 * cols, rtol=1e-6)


SPLIT_BITS = [(0, 4, 0, 2), (4, 4, 2, 2), (0, 4, 4, 2), (4, 4, 6, 2),   # Q6_K's quarters
              (0, 4, 3, 1), (4, 4, 7, 1), (2, 2, 5, 1), (6, 2, 0, 1)]   # Q5_K's and Q3_K's fields
FIFTH_BITS = [(0, 0), (4, 16), (0, 12), (4, 28)]   # (nibble's shift, first bit of qh): Q5_0, Q5_1


@pytest.mark.parametrize("avx2", [True, False])
def test_dot4_intrinsics_equal_integer_sums(avx2, monkeypatch):
    """bits.dot4_int8, dot4_bits, dot4_nibbles_fifth_bit and dot4_codebook against numpy, on the
    extremes of their ranges (int8 activations within +-127, as quantized), in both code paths: x86's
    pmaddubsw / pmaddwd / pshufb (where the host has AVX2) and the plain vector IR of other CPUs."""
    import numba
    from engine.kernels import bits
    if avx2 and not bits._host_has_avx2():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(bits, "_host_has_avx2", lambda: avx2)
    split_bits, fifth_bits = np.array(SPLIT_BITS), np.array(FIFTH_BITS)

    def run(acc, w, x, split_bits, fifth_bits):   # compiled afresh below, so the chosen code path is the one generated
        for lanes in range(0, 16, bits.DOT4_LANES):
            bits.dot4_int8(acc[0], lanes, w, 4 * lanes, x, 0)
            bits.dot4_codebook(acc[1], lanes, w, 4 * lanes, 0, x, 4)
            bits.dot4_codebook(acc[2], lanes, w, 4 * lanes, 4, x, 8)
            for k in range(len(split_bits)):
                low_shift, low_bits, high_shift, high_bits = split_bits[k]
                bits.dot4_bits(acc[3 + k], lanes, w, 4 * lanes, low_shift, low_bits, 64 + 4 * lanes, high_shift,
                               high_bits, x, 12)
            for k in range(len(fifth_bits)):
                bits.dot4_nibbles_fifth_bit(acc[11 + k], lanes, w, 4 * lanes, fifth_bits[k, 0], 64 + 4 * lanes,
                                            fifth_bits[k, 1], x, 8)
    run = numba.njit(run)
    rng = np.random.default_rng(11)
    x_type, top = np.int8, 127
    values = np.array(bits.IQ4_VALUES, np.int64)
    for w, x in [(rng.integers(0, 256, 128, dtype=np.uint8), rng.integers(-top, top + 1, 16).astype(x_type)),
                 (np.full(128, 0x80, np.uint8), np.full(16, -top, x_type)),     # -128 * -127, four times
                 (np.full(128, 0xFF, np.uint8), np.full(16, top, x_type)),
                 (np.full(128, 0x7F, np.uint8), np.full(16, -top, x_type)),
                 (np.full(128, 0x00, np.uint8), np.full(16, top, x_type))]:      # the codebook's -127
        acc = np.zeros((15, 16), np.int32)
        run(acc, w, x, split_bits, fifth_bits)
        q = w[:64].reshape(16, 4).astype(np.int64)
        high = w[64:].reshape(16, 4).astype(np.int64)
        x = x.astype(np.int64)
        assert np.array_equal(acc[0], (q.astype(np.uint8).view(np.int8).astype(np.int64) * x[:4]).sum(1))
        assert np.array_equal(acc[1], (values[q & 15] * x[4:8]).sum(1))
        assert np.array_equal(acc[2], (values[q >> 4] * x[8:12]).sum(1))
        for k, (low_shift, low_bits, high_shift, high_bits) in enumerate(SPLIT_BITS):
            split = (q >> low_shift) & (2 ** low_bits - 1) | ((high >> high_shift) & (2 ** high_bits - 1)) << low_bits
            assert np.array_equal(acc[3 + k], (split * x[12:16]).sum(1))
        word = high[:, 0] | high[:, 1] << 8 | high[:, 2] << 16 | high[:, 3] << 24   # each lane's qh
        for k, (shift, first) in enumerate(FIFTH_BITS):
            five = (q >> shift) & 15 | ((word[:, None] >> (first + np.arange(4))) & 1) << 4
            assert np.array_equal(acc[11 + k], (five * x[8:12]).sum(1))


@pytest.mark.parametrize("avx2", [True, False])
def test_partial_sums_scaled_equal_integer_sums(avx2, monkeypatch):
    """bits.dot4_partial and dot4_bits_partial over the most quads they allow (8 of nibbles:
    Q4_K's sub-block of 32; 4 of 2-bit fields: Q2_K's 16 weights per scale; 4 of 5-bit values:
    Q5_K's halves of a sub-block; 4 of 3-bit values, Q3_K's) and bits.scaled_sums, with unsigned
    scales, signed ones (Q3_K's, down to -32) and without (Q4_0's scales of 1), and
    scaled_offset_sums (Q3_K's offset of 4 times the sum of the 16 activations), against numpy at
    the extremes (15 * 127 in all 32 products of a lane, times the largest 6-bit scale), in both
    code paths (int16 pair sums; int32 sums)."""
    import numba
    from engine.kernels import bits
    if avx2 and not bits._host_has_avx2():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(bits, "_host_has_avx2", lambda: avx2)

    def run(out, unscaled, crumbs, fives, threes, w, x, scales, offset):   # 16 lanes; quad j of the 16 lanes at 64 j
        partial = np.zeros(32, np.int32)    # nibbles at bit 0, then 4
        two_bits = np.zeros(16, np.int32)   # Q2_K's: bits 6-7, 4 quads (16 weights, one scale)
        five_bits = np.zeros(16, np.int32)  # Q5_K's: the high nibble, and bit 7 of quad j + 4
        three_bits = np.zeros(16, np.int32)  # Q3_K's: bits 0-1, and bit 3 of quad j + 4
        for j in range(8):
            for lanes in range(0, 16, bits.DOT4_LANES):
                bits.dot4_partial(partial, lanes, w, 64 * j + 4 * lanes, x, 4 * j, 0, 4)
                bits.dot4_partial(partial, 16 + lanes, w, 64 * j + 4 * lanes, x, 32 + 4 * j, 4, 4)
                if j < 4:
                    bits.dot4_partial(two_bits, lanes, w, 64 * j + 4 * lanes, x, 4 * j, 6, 2)
                    bits.dot4_bits_partial(five_bits, lanes, w, 64 * j + 4 * lanes, 4, 4, 64 * (j + 4) + 4 * lanes, 7,
                                           1, x, 4 * j)
                    bits.dot4_bits_partial(three_bits, lanes, w, 64 * j + 4 * lanes, 0, 2, 64 * (j + 4) + 4 * lanes, 3,
                                           1, x, 4 * j)
        for lanes in range(0, 32, bits.DOT4_LANES):
            bits.scaled_sums(out, lanes, partial, lanes, scales, lanes)
            bits.scaled_sums(unscaled, lanes, partial, lanes, None, 0)
        for lanes in range(0, 16, bits.DOT4_LANES):
            bits.scaled_sums(crumbs, lanes, two_bits, lanes, scales, lanes)
            bits.scaled_sums(fives, lanes, five_bits, lanes, (scales - 32).astype(np.int8), 16 + lanes)
            bits.scaled_offset_sums(threes, lanes, three_bits, lanes, (scales - 32).astype(np.int8), lanes, offset)
    run = numba.njit(run)
    rng = np.random.default_rng(12)
    x_type, top = np.int8, 127
    for w, x, scales in [(rng.integers(0, 256, 512, dtype=np.uint8), rng.integers(-top, top + 1, 64).astype(x_type),
                          rng.integers(0, 64, 32, dtype=np.uint8)),
                         (np.full(512, 0xFF, np.uint8), np.full(64, top, x_type), np.full(32, 63, np.uint8)),
                         (np.full(512, 0xFF, np.uint8), np.full(64, -top, x_type), np.full(32, 63, np.uint8)),
                         (np.full(512, 0xFF, np.uint8), np.full(64, top, x_type), np.zeros(32, np.uint8))]:   # -32
        out, unscaled = np.full(32, 12345, np.int32), np.full(32, 12345, np.int32)   # stored, not added
        crumbs, fives, threes = (np.full(16, 12345, np.int32) for _ in range(3))
        offset = 4 * int(x[:16].astype(np.int64).sum())   # Q3_K's quants are 0..7 for -4..3
        run(out, unscaled, crumbs, fives, threes, w, x, scales, offset)
        quads = w.reshape(8, 16, 4).transpose(1, 0, 2).reshape(16, 32).astype(np.int64)   # lane, weight
        x = x.astype(np.int64)
        sums = np.r_[((quads & 15) * x[:32]).sum(1), ((quads >> 4) * x[32:]).sum(1)]
        assert np.array_equal(out, scales * sums) and np.array_equal(unscaled, sums)
        assert np.array_equal(crumbs, scales[:16] * ((quads[:, :16] >> 6) * x[:16]).sum(1))
        five = (quads[:, :16] >> 4) | (quads[:, 16:] >> 7) << 4
        assert np.array_equal(fives, (scales[16:].astype(np.int64) - 32) * (five * x[:16]).sum(1))
        three = (quads[:, :16] & 3) | ((quads[:, 16:] >> 3) & 1) << 2
        assert np.array_equal(threes, (scales[:16].astype(np.int64) - 32) * ((three - 4) * x[:16]).sum(1))


# --- the exponential of SwiGLU and softmax ------------------------------------------------------

def test_exp_f32_is_within_float32_rounding_of_exp():
    """ops.exp_f32 compiled as the kernels compile it (fast-math), against float64 exp: dense
    over the whole range it computes, and clamped outside it. (Without fast-math its error is
    below 1e-7; fast-math lets LLVM merge the two parts of ln 2, which costs up to 3e-7 at the
    ends of the range.)"""
    import numba
    from engine.kernels.ops import exp_f32

    @numba.njit(fastmath=True)
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_f32(x[i])
    inside = np.r_[np.linspace(-87.3, 88.3, 400_001), -1e-30, 0.0, 1e-30, np.log(2) / 2, -np.log(2) / 2].astype(np.float32)
    out = np.empty_like(inside)
    apply(inside, out)
    relative = np.abs(out / np.exp(inside.astype(np.float64)) - 1)
    print(f"exp_f32: max relative error {relative.max():.2e}")
    assert relative.max() < 3e-7
    outside = np.array([-1e30, -1000, -87.31, 88.31, 1000, 1e30], np.float32)
    out = np.empty_like(outside)
    apply(outside, out)
    clamped = np.float32([-87.3, -87.3, -87.3, 88.3, 88.3, 88.3]).astype(np.float64)
    assert np.allclose(out, np.exp(clamped), rtol=3e-7, atol=0)


def test_swiglu_and_attention_softmax_equal_numpy():
    """The two kernels that exponentiate, against float64 numpy, with inputs large enough that
    exp_f32 clamps (gates of +-200; attention scores 300 apart)."""
    from engine.kernels.attention import KVCache
    from engine.kernels.ops import swiglu
    rng = np.random.default_rng(3)
    gate = (rng.standard_normal((3, 5000)) * 4).astype(np.float32)
    gate[0, :4] = [-200, 200, 0, -88.5]
    up = rng.standard_normal((3, 5000)).astype(np.float32)
    out = np.empty_like(gate)
    swiglu(gate, up, out)
    g = gate.astype(np.float64)
    assert np.allclose(out, g / (1 + np.exp(-g)) * up, rtol=2e-6, atol=1e-30)

    tokens, heads, kv_heads, head_dim, start = 3, 4, 2, 64, 5
    cache = KVCache("f32", 1, kv_heads, 16, head_dim)
    k = (rng.standard_normal((start + tokens, kv_heads, head_dim)) * 3).astype(np.float32)
    v = rng.standard_normal((start + tokens, kv_heads, head_dim)).astype(np.float32)
    q = (rng.standard_normal((tokens, heads, head_dim)) * 10).astype(np.float32)
    cache.store(0, k, v, *KVCache.rows(0, len(k)))
    out = np.empty_like(q)
    cache.attend(0, q, *KVCache.rows(start, tokens), out)
    spreads = []
    for t in range(tokens):
        for h in range(heads):
            keys, values = k[:start + t + 1, h // 2].astype(np.float64), v[:start + t + 1, h // 2]
            scores = keys @ q[t, h] / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            spreads.append(scores.max() - scores.min())
            assert np.allclose(out[t, h], weights @ values / weights.sum(), rtol=1e-5, atol=1e-6)
    assert max(spreads) > 88   # some exponentials were clamped


@pytest.mark.parametrize("kind", ["f16", "q8_0", "f32"])
def test_kv_cache_stores_where_asked_and_rejects_what_does_not_fit(kind):
    """Each kind stores (tokens, kv_heads, head_dim) at (layer, head, position), each with its
    compiled store: exactly the input (f32), numpy's rounding to half floats (f16), or the
    activations' int8 blocks and scales (q8_0, quant.quantize_activations); reading back equals
    the input to the kind's precision and nothing else in the cache moved. Shapes or positions
    outside the cache are refused before any kernel writes (the stores have no bounds checks)."""
    from engine.kernels.attention import KVCache
    rng = np.random.default_rng(4)
    cache = KVCache(kind, 3, 2, 16, 64)
    k, v = rng.standard_normal((2, 3, 2, 64)).astype(np.float32)
    cache.store(1, k, v, *KVCache.rows(13, 3))   # positions 13..15, the last ones
    for stored, scales, x in ((cache.k, cache.k_scales, k), (cache.v, cache.v_scales, v)):
        by_head = x.transpose(1, 0, 2)   # (kv_heads, positions, head_dim), as the cache holds it
        got = stored[1, 0, :, 13:16].astype(np.float32)
        if kind == "f16":
            assert np.array_equal(stored[1, 0, :, 13:16], by_head.astype(np.float16).view(np.uint16))
            got = stored[1, 0, :, 13:16].view(np.float16).astype(np.float32)
        elif kind == "q8_0":
            xq, xd = np.empty((6, 64), np.int8), np.empty((6, 2), np.float32)
            quant.quantize_activations(np.ascontiguousarray(by_head.reshape(6, 64)), xq, xd)
            assert np.array_equal(stored[1, 0, :, 13:16], xq.reshape(2, 3, 64))
            assert np.array_equal(scales[1, 0, :, 13:16], xd.reshape(2, 3, 2))
            got = (got.reshape(2, 3, 2, 32) * scales[1, 0, :, 13:16, :, None]).reshape(2, 3, 64)
        tolerance = {"f16": 1e-3, "q8_0": 1.5e-2, "f32": 0}[kind]
        assert np.allclose(got, by_head, rtol=tolerance, atol=tolerance * np.abs(x).max())
        assert not stored[0].any() and not stored[2].any() and not stored[1, :, :, :13].any()
        assert not scales[0].any() and not scales[2].any()
    for layer, k_bad, start in ((1, k, 14), (1, k[:, :1], 0), (1, k[..., :32], 0), (3, k, 0), (1, k, -1)):
        with pytest.raises(ValueError, match="does not fit the cache|is not in the cache"):
            cache.store(layer, k_bad, v if k_bad is k else k_bad, *KVCache.rows(start, len(k)))
    slots, positions = KVCache.rows(0, 3)
    bad_rows = [(np.array([0, 1, 0]), positions),   # a slot the cache does not have
                (slots, np.array([0, 16, 1])), (slots, np.array([0, -1, 1])),   # positions outside
                (slots, positions.astype(np.int32)), (slots, positions[:2])]   # wrong type, too few
    for bad_slots, bad_positions in bad_rows:
        with pytest.raises(ValueError, match="does not fit the cache"):
            cache.store(1, k, v, bad_slots, bad_positions)


@pytest.mark.parametrize("kind, tolerance", [("f32", 1e-5), ("f16", 3e-3), ("q8_0", 3e-2)])
def test_attention_over_each_cache_kind_equals_numpy(kind, tolerance):
    """Grouped-query attention (3 query heads per KV head) against float64 numpy over the
    unrounded keys and values: a prompt of 5 tokens after 7 cached ones, then one decode token
    at position 300 (the cache's layout, the causal limits, scores far apart). The
    tolerance is the cache's rounding: exact for f32, half floats, int8 blocks."""
    from engine.kernels.attention import KVCache
    rng = np.random.default_rng(6)
    heads, kv_heads, head_dim, positions = 6, 2, 64, 320
    cache = KVCache(kind, 2, kv_heads, positions, head_dim)
    k = rng.standard_normal((positions, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((positions, kv_heads, head_dim)).astype(np.float32)

    def expected(q, start):
        out = np.empty(q.shape)
        for t in range(len(q)):
            for h in range(heads):
                keys, values = k[:start + t + 1, h // 3].astype(np.float64), v[:start + t + 1, h // 3]
                weights = np.exp(keys @ q[t, h] / np.sqrt(head_dim))
                out[t, h] = weights @ values / weights.sum()
        return out
    rows = KVCache.rows
    cache.store(1, k[:7], v[:7], *rows(0, 7))
    cache.store(1, k[7:12], v[7:12], *rows(7, 5))
    q = rng.standard_normal((5, heads, head_dim)).astype(np.float32)
    out = np.empty_like(q)
    cache.attend(1, q, *rows(7, 5), out)
    assert np.allclose(out, expected(q, 7), rtol=tolerance, atol=tolerance)
    cache.store(1, k[12:300], v[12:300], *rows(12, 288))
    cache.store(1, k[300:301], v[300:301], *rows(300, 1))
    q = rng.standard_normal((1, heads, head_dim)).astype(np.float32) * 4   # peaked weights
    out = np.empty_like(q)
    cache.attend(1, q, *rows(300, 1), out)
    assert np.allclose(out, expected(q, 300), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "f32"])
def test_attention_rows_of_several_slots_equal_each_slot_alone(kind):
    """A batched decode step: rows of three slots at different positions, in one call, give
    bit for bit what each slot's row gives alone (the server's batch invariance)."""
    from engine.kernels.attention import KVCache
    rng = np.random.default_rng(7)
    heads, kv_heads, head_dim, positions = 4, 2, 64, 40
    cache = KVCache(kind, 1, kv_heads, positions, head_dim, slots=3)
    lengths = [5, 33, 17]
    for slot, length in enumerate(lengths):
        k, v = rng.standard_normal((2, length, kv_heads, head_dim)).astype(np.float32)
        cache.store(0, k, v, *KVCache.rows(0, length, slot))
    q = rng.standard_normal((3, heads, head_dim)).astype(np.float32)
    together = np.empty_like(q)
    order = np.array([2, 0, 1])
    cache.attend(0, q, order, np.array([lengths[s] - 1 for s in order]), together)
    for row, slot in enumerate(order):
        alone = np.empty_like(q[:1])
        cache.attend(0, q[row:row + 1], *KVCache.rows(lengths[slot] - 1, 1, slot), alone)
        assert np.array_equal(alone[0], together[row])


def test_numba_cache_follows_every_kernel_source(tmp_path):
    """numba's cache=True only checks a kernel's own file; an edit of bits.py must still start
    a fresh cache (kernels/compiler.py keys the cache directory on all the package's sources)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    package = tmp_path / "kernels_copy"
    shutil.copytree(Path(compiler.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}

    def cache_dir() -> Path:
        code = "import kernels_copy.compiler; from numba.core import config; print(config.CACHE_DIR)"
        return Path(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                                   capture_output=True, text=True).stdout.strip())
    first = cache_dir()
    assert first.parent == package / "__pycache__"
    first.mkdir(parents=True)
    assert cache_dir() == first                       # same sources, same cache
    with open(package / "bits.py", "a") as source:
        source.write("\n# an edit\n")
    second = cache_dir()
    assert second != first and second.parent == first.parent
    assert not first.exists()                          # the stale cache is removed
