"""LLVM features numba lacks: half-precision conversions, a prefetch hint, stack arrays.

numba has no float16 type on the CPU. The conversions reinterpret uint16 bit patterns with
LLVM's own `half` type, so LLVM emits the hardware conversion (vcvtph2ps with F16C) and can
vectorize loops that use them.
"""
import functools

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)


@intrinsic
def f16_to_f32(typingctx, bits):
    """uint16 bits of an IEEE half -> float32 (exact)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@njit(inline="always")
def f16_at_bytes(row, offset):
    """The little-endian fp16 value at bytes offset, offset + 1 of a uint8 row, as float32."""
    return f16_to_f32(np.uint16(np.uint16(row[offset]) | (np.uint16(row[offset + 1]) << np.uint16(8))))


@intrinsic
def f32_to_f16(typingctx, value):
    """float32 -> uint16 bits of the nearest IEEE half (round to nearest even)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(value), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c in float32, rounded once (x86's vfmadd with FMA). Kernels spell out their fused
    multiply-adds instead of leaving them to fast-math: LLVM then cannot fuse the same sum
    differently in two kernels, so a token's result does not depend on how many tokens share its
    call (a tile or one by one; batch invariance, which the server relies on)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        return builder.call(_declare(builder, "llvm.fma.f32", f32, f32, f32, f32), list(args))
    return types.float32(a, b, c), codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (a reinterpretation, no conversion)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def bf16_to_f32(typingctx, bits):
    """uint16 bits of a bfloat16 -> float32 (exact: bf16 is the top half of a float32)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of array.flat[index] (C-contiguous array).

    Only a hint: it never faults, so an index near the end needs no bounds check. The GEMVs
    prefetch 2 KiB ahead (layout.prefetch_ahead): the hardware prefetchers stop at each 4 KiB
    page, and the hint took the Q4_0 GEMV from about 12 to 17 GB/s at 2 threads here."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        address = builder.bitcast(builder.gep(data, [index]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]), "llvm.prefetch.p0i8")
        # read (0), keep in all cache levels (3), data cache (1)
        builder.call(hint, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


@intrinsic
def _stack_pointer(typingctx, dtype, rows, columns):
    literal = (types.IntegerLiteral, types.BooleanLiteral)
    if not (isinstance(rows, literal) and isinstance(columns, literal) and isinstance(dtype, types.NumberClass)):
        return None
    item = dtype.instance_type
    count = rows.literal_value * columns.literal_value

    def codegen(context, builder, signature, args):
        # in the function's entry block, so a loop does not grow the stack
        return cgutils.alloca_once(builder, context.get_value_type(item), size=count)
    return types.CPointer(item)(dtype, rows, columns), codegen


@njit(inline="always")
def stack_array(dtype, rows, columns):
    """A scratch array of rows * columns items (both constants) on the stack, flat (index it
    as [row * columns + column]), for kernel accumulators.

    numba's np.empty is a heap allocation LLVM knows nothing about, so it must assume that
    stores to it may change the weights being read: it writes the accumulators back to memory
    on every step. Stack memory cannot alias the arguments, so LLVM keeps it in registers."""
    return carray(_stack_pointer(dtype, rows, columns), rows * columns)


def _vector_pointer(context, builder, array_type, array, index_type, index, element, count):
    """A pointer to `count` items of `element` type starting at array.flat[index]."""
    data = context.make_array(array_type)(context, builder, array).data
    index = context.cast(builder, index, index_type, types.intp)
    return builder.bitcast(builder.gep(data, [index]), ir.VectorType(element, count).as_pointer())


@functools.cache
def _host_has_avx2() -> bool:
    import llvmlite.binding as llvm
    from numba.core import config
    return config.CPU_NAME in (None, "host") and bool(llvm.get_host_cpu_features().get("avx2"))


@functools.cache
def _host_has_vnni() -> bool:
    """Whether vpdpbusd exists on 256-bit registers (AVX-512 VNNI with VL, or AVX-VNNI)."""
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return _host_has_avx2() and bool(features.get("avxvnni") or features.get("avx512vnni") and features.get("avx512vl"))


DOT4_LANES = 8   # output lanes per dot4 call: 32 bytes of weights, one 256-bit register


def _declare(builder, name, result, *arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, list(arguments)), name)


def _repeat(builder, vector, times):
    """<4 x T> -> <4 * times x T>: the 4 items again and again (one per lane)."""
    return builder.shuffle_vector(vector, ir.Constant(vector.type, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 4 * times), [0, 1, 2, 3] * times))


def _byte_pair_sums(builder, weights, x):
    """<16 x i16>: pmaddubsw of 32 unsigned weight bytes (4 per lane) by 4 int8 activations x, each
    lane's 4 products added in two pairs (AVX2 only)."""
    bytes32, words16 = weights.type, ir.VectorType(ir.IntType(16), 16)
    maddubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", words16, bytes32, bytes32)
    return builder.call(maddubs, [weights, _repeat(builder, x, 8)])


def _unsigned_by_signed(builder, weights, x):
    """(|w|, x with w's sign, x repeated for each of the 8 lanes): the operands that let x86's
    unsigned-by-signed byte products (pmaddubsw, vpdpbusd) multiply signed int8 weights."""
    bytes32 = weights.type
    sign = _declare(builder, "llvm.x86.avx2.psign.b", bytes32, bytes32, bytes32)
    absolute = _declare(builder, "llvm.abs.v32i8", bytes32, bytes32, ir.IntType(1))
    return (builder.call(absolute, [weights, ir.Constant(ir.IntType(1), 0)]),
            builder.call(sign, [_repeat(builder, x, 8), weights]))


def _dot4_sums(builder, weights, x, signed):
    """<8 x i32>: lane l gets sum over c < 4 of weights[4 l + c] * x[c], for 32 weight bytes
    (int8 if `signed`, else unsigned below 128) and 4 int8 activations x (<4 x i8>).

    With AVX2 this is llama.cpp's idiom, which LLVM does not find on its own: pmaddubsw
    multiplies unsigned bytes by signed ones and adds pairs into int16 (signed weights go in as
    |w|, with their sign moved onto x: at most 2 * 128 * 127, no saturation, activations being
    within +-127), then pmaddwd by ones adds the pairs into int32. Four to six instructions per
    32 weights, against about sixteen for widening products lane by lane. Without AVX2 the same
    sums are written in plain LLVM vector code."""
    i32 = ir.IntType(32)

    def every_other(start, source):
        count = source.type.count // 2
        return builder.shuffle_vector(source, ir.Constant(source.type, None),
                                      ir.Constant(ir.VectorType(i32, count), list(range(start, 2 * count, 2))))
    if _host_has_avx2():
        bytes32, words16, ints8 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16), ir.VectorType(i32, 8)
        madd = _declare(builder, "llvm.x86.avx2.pmadd.wd", ints8, words16, words16)
        if signed:
            maddubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", words16, bytes32, bytes32)
            pairs = builder.call(maddubs, list(_unsigned_by_signed(builder, weights, x)))
        else:
            pairs = _byte_pair_sums(builder, weights, x)
        return builder.call(madd, [pairs, ir.Constant(words16, [1] * 16)])
    wide = ir.VectorType(i32, 32)
    extend = builder.sext if signed else builder.zext
    products = builder.mul(extend(weights, wide), builder.sext(_repeat(builder, x, 8), wide))
    pairs = builder.add(every_other(0, products), every_other(1, products))
    return builder.add(every_other(0, pairs), every_other(1, pairs))


def _dot4_into(context, builder, acc_type, acc, index_type, index, weights, x, signed):
    """acc.flat[index:index + 8] (int32) += _dot4_sums(weights, x, signed). With VNNI that is
    one vpdpbusd, which multiplies unsigned bytes by signed ones and adds each
    lane's 4 products to the accumulator in int32 (signed weights go in as |w|, their sign moved
    onto x, as for pmaddubsw): one instruction instead of pmaddubsw, pmaddwd and an add."""
    if not _host_has_vnni():
        _accumulate(context, builder, acc_type, acc, index_type, index, _dot4_sums(builder, weights, x, signed))
        return
    ints8 = ir.VectorType(ir.IntType(32), 8)
    weights, x_bytes = _unsigned_by_signed(builder, weights, x) if signed else (weights, _repeat(builder, x, 8))
    dpbusd = _declare(builder, "llvm.x86.avx512.vpdpbusd.256", ints8, ints8, ints8, ints8)
    pointer = _vector_pointer(context, builder, acc_type, acc, index_type, index, ir.IntType(32), DOT4_LANES)
    builder.store(builder.call(dpbusd, [builder.load(pointer, align=4), builder.bitcast(weights, ints8),
                                        builder.bitcast(x_bytes, ints8)]), pointer, align=4)


def _load(context, builder, array_type, array, index_type, index, count):
    """<count x item>: the items array.flat[index:index + count] (no alignment assumed)."""
    item = context.get_value_type(array_type.dtype)
    return builder.load(_vector_pointer(context, builder, array_type, array, index_type, index, item, count), align=1)


def _splat(context, builder, vector_type, value, value_type):
    """A vector of vector_type with the run-time integer `value` in every item."""
    item = context.cast(builder, value, value_type, types.int64)
    item = builder.trunc(item, vector_type.element) if vector_type.element.width < 64 else item
    one = builder.insert_element(ir.Constant(vector_type, None), item, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count))


def _shifted_right(context, builder, vector, shift, shift_type):
    """<32 x i8> vector >> shift in every byte, shift a run-time integer, *before masking*: the
    bytes are shifted as 16-bit words (x86 has no byte shifts; a word shift by a count in a
    register is one instruction, where LLVM expands a byte shift by a non-constant count into
    many), so each byte's top bits come from its neighbour; every caller keeps only the low
    `bits` of each byte, with shift + bits <= 8, which are exact."""
    words = ir.VectorType(ir.IntType(16), 16)
    shifted = builder.lshr(builder.bitcast(vector, words), _splat(context, builder, words, shift, shift_type))
    return builder.bitcast(shifted, vector.type)


def _accumulate(context, builder, acc_type, acc, index_type, index, sums):
    """acc.flat[index...] += sums, a vector of int32 (or of int16 pair sums, in the same 32 bytes)."""
    pointer = _vector_pointer(context, builder, acc_type, acc, index_type, index, sums.type.element, sums.type.count)
    builder.store(builder.add(builder.load(pointer, align=4), sums), pointer, align=4)


def _dot4_types_ok(acc, w, x):
    return (isinstance(acc, types.Array) and acc.dtype == types.int32 and isinstance(w, types.Array)
            and w.dtype in (types.uint8, types.int8) and isinstance(x, types.Array) and x.dtype == types.int8)


@intrinsic
def dot4_int8(typingctx, acc, acc_index, w, w_index, x, x_index):
    """acc.flat[acc_index + l] += sum over c < 4 of w.flat[w_index + 4 l + c] * x.flat[x_index + c]
    for l < 8: int8 weights, 4 consecutive bytes per lane (the quads of kernels/layout.py), times
    4 int8 activations, summed into int32."""
    if not _dot4_types_ok(acc, w, x):
        return None

    def codegen(context, builder, signature, args):
        (acc_t, acc_i_t, w_t, w_i_t, x_t, x_i_t), (acc_a, acc_i, w_a, w_i, x_a, x_i) = signature.args, args
        weights = _load(context, builder, w_t, w_a, w_i_t, w_i, 32)
        _dot4_into(context, builder, acc_t, acc_a, acc_i_t, acc_i, weights,
                   _load(context, builder, x_t, x_a, x_i_t, x_i, 4), signed=True)
        return context.get_dummy_value()
    return types.void(acc, acc_index, w, w_index, x, x_index), codegen


def _nibbles(context, builder, vector, shift, shift_type):
    """<32 x i8>: (vector >> shift) & 15 in every byte (shift 0 or 4)."""
    fifteen = ir.Constant(vector.type, [15] * 32)
    return builder.and_(_shifted_right(context, builder, vector, shift, shift_type), fifteen)


def _low_bits(context, builder, vector, shift, shift_type, bits, bits_type):
    """<32 x i8>: (vector >> shift) & (2^bits - 1) in every byte (shift and bits: run-time
    integers that are constants of each call, which LLVM folds)."""
    one = ir.Constant(vector.type, [1] * 32)
    mask = builder.sub(builder.shl(one, _splat(context, builder, vector.type, bits, bits_type)), one)
    return builder.and_(_shifted_right(context, builder, vector, shift, shift_type), mask)


def _bits_moved(context, builder, vector, shift, shift_type, bits, bits_type, to, to_type):
    """<32 x i8>: ((vector >> shift) & (2^bits - 1)) << to in every byte, in one shift and one
    mask: the bytes are shifted as 16-bit words by shift - to, right or left (LLVM folds the
    choice: both are constants of each call), and a field moved within its byte never crosses
    into the neighbour's bits that the mask keeps (shift + bits <= 8, to + bits <= 8)."""
    words = ir.VectorType(ir.IntType(16), 16)
    distance = builder.sub(context.cast(builder, shift, shift_type, types.int64),
                           context.cast(builder, to, to_type, types.int64))
    as_words = builder.bitcast(vector, words)
    right = builder.lshr(as_words, _splat(context, builder, words, distance, types.int64))
    left = builder.shl(as_words, _splat(context, builder, words, builder.neg(distance), types.int64))
    moved = builder.select(builder.icmp_signed(">=", distance, ir.Constant(ir.IntType(64), 0)), right, left)
    one = ir.Constant(vector.type, [1] * 32)
    field = builder.sub(builder.shl(one, _splat(context, builder, vector.type, bits, bits_type)), one)
    return builder.and_(builder.bitcast(moved, vector.type),
                        builder.shl(field, _splat(context, builder, vector.type, to, to_type)))


@intrinsic
def dot4_partial(typingctx, acc, acc_index, w, w_index, x, x_index, shift, bits):
    """As dot4_int8 for weights of `bits` bits (4: Q4_0, Q4_K's nibbles; 2: Q2_K's), packed in
    bytes: the field at bit `shift` of each of the 4 bytes of a lane times x.flat[x_index + c]
    (unsigned: no sign to move), added to a partial sum that scaled_sums finishes: 32 bytes of
    acc per 8 lanes (acc.flat[acc_index:acc_index + 8], int32). With AVX2 it holds pmaddubsw's
    16 int16 pair sums, added without widening: the pmaddwd that widens
    them runs once per block instead of once per quad, and multiplies by the scales at the same
    time. At most 8 calls per partial sum for 4 bits: 8 * 2 * 15 * 127 < 2^15. Otherwise plain
    int32 sums. (With VNNI too: vpdpbusd into int32 partial sums measured no faster here, one
    core in cache: Q4_0 21-22 us either way for 512 x 1536, Q4_K 28 vs 27 us.)"""
    if not (_dot4_types_ok(acc, w, x) and isinstance(shift, types.Integer) and isinstance(bits, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        acc_t, acc_i_t, w_t, w_i_t, x_t, x_i_t, shift_t, bits_t = signature.args
        acc_a, acc_i, w_a, w_i, x_a, x_i, shift, bits = args
        q = _low_bits(context, builder, _load(context, builder, w_t, w_a, w_i_t, w_i, 32), shift, shift_t, bits, bits_t)
        xq = _load(context, builder, x_t, x_a, x_i_t, x_i, 4)
        if _host_has_avx2():
            _accumulate(context, builder, acc_t, acc_a, acc_i_t, acc_i, _byte_pair_sums(builder, q, xq))
        else:
            _dot4_into(context, builder, acc_t, acc_a, acc_i_t, acc_i, q, xq, signed=False)
        return context.get_dummy_value()
    return types.void(acc, acc_index, w, w_index, x, x_index, shift, bits), codegen


def _scaled_sums_types_ok(out, acc, scales) -> bool:
    return (isinstance(out, types.Array) and out.dtype == types.int32 and isinstance(acc, types.Array)
            and acc.dtype == types.int32
            and (isinstance(scales, types.NoneType)
                 or isinstance(scales, types.Array) and scales.dtype in (types.uint8, types.int8)))


def _scaled_sums_codegen(context, builder, signature, args):
    """scaled_sums, and scaled_offset_sums when there is a seventh argument (the offset)."""
    out_t, out_i_t, acc_t, acc_i_t, scales_t, scales_i_t = signature.args[:6]
    out_a, out_i, acc_a, acc_i, scales_a, scales_i = args[:6]
    offset = _splat(context, builder, ir.VectorType(ir.IntType(32), 8), args[6], signature.args[6]) \
        if len(args) > 6 else None
    i16, i32 = ir.IntType(16), ir.IntType(32)
    ints8, words16 = ir.VectorType(i32, 8), ir.VectorType(i16, 16)
    if isinstance(scales_t, types.NoneType):
        scale = ir.Constant(ints8, [1] * 8)
    else:
        extend = builder.sext if scales_t.dtype == types.int8 else builder.zext
        scale = extend(_load(context, builder, scales_t, scales_a, scales_i_t, scales_i, DOT4_LANES), ints8)
    if _host_has_avx2():
        madd = _declare(builder, "llvm.x86.avx2.pmadd.wd", ints8, words16, words16)
        pairs = builder.load(_vector_pointer(context, builder, acc_t, acc_a, acc_i_t, acc_i, i16, 16), align=4)
        if offset is not None:   # from the first of each lane's two int16 halves
            first = builder.and_(offset, ir.Constant(ints8, [0xFFFF] * 8))
            pairs = builder.sub(pairs, builder.bitcast(first, words16))
        low_half = builder.and_(scale, ir.Constant(ints8, [0xFFFF] * 8))   # a negative scale's high bits cleared
        high_half = builder.shl(scale, ir.Constant(ints8, [16] * 8))
        scale_pairs = builder.bitcast(builder.or_(low_half, high_half), words16)
        result = builder.call(madd, [pairs, scale_pairs])
    else:
        sums = builder.load(_vector_pointer(context, builder, acc_t, acc_a, acc_i_t, acc_i, i32, 8), align=4)
        if offset is not None:
            sums = builder.sub(sums, offset)
        result = builder.mul(sums, scale)
    builder.store(result, _vector_pointer(context, builder, out_t, out_a, out_i_t, out_i, i32, 8), align=4)
    return context.get_dummy_value()


@intrinsic
def scaled_sums(typingctx, out, out_index, acc, acc_index, scales, scales_index):
    """out.flat[out_index + l] = scale of lane l * (its partial sum at acc_index, made by
    dot4_partial or dot4_bits_partial), int32, for 8 lanes. The scales are the bytes
    scales.flat[scales_index + l]: uint8 below 64 (Q4_K's 6-bit scales), int8 (Q3_K's, -32..31),
    or 1 where scales is None (Q4_0). With AVX2's int16 pair sums this is one pmaddwd by the
    scales (each lane's two int16 halves hold its scale)."""
    if not _scaled_sums_types_ok(out, acc, scales):
        return None
    return types.void(out, out_index, acc, acc_index, scales, scales_index), _scaled_sums_codegen


@intrinsic
def scaled_offset_sums(typingctx, out, out_index, acc, acc_index, scales, scales_index, offset):
    """As scaled_sums, of each partial sum less `offset` (the same for the 8 lanes): a format's
    zero point times the sum of the activations, taken off before the scales multiply (Q3_K's
    4), so that it needs no multiply of its own. With AVX2 it comes off the first int16 half of
    each lane's pair, which must stay in range: |half - offset| < 2^15."""
    if not (_scaled_sums_types_ok(out, acc, scales) and isinstance(offset, types.Integer)):
        return None
    return types.void(out, out_index, acc, acc_index, scales, scales_index, offset), _scaled_sums_codegen




def _dot4_bits_intrinsic(partial: bool):
    """dot4_bits (int32 sums) or dot4_bits_partial (partial sums for scaled_sums)."""
    def typer(typingctx, acc, acc_index, w, low_index, low_shift, low_bits, high_index, high_shift, high_bits, x,
              x_index):
        if not (_dot4_types_ok(acc, w, x) and all(isinstance(a, types.Integer) for a in
                                                  (low_shift, low_bits, high_shift, high_bits))):
            return None

        def codegen(context, builder, signature, args):
            acc_t, acc_i_t, w_t, low_i_t, low_shift_t, low_bits_t, high_i_t, high_shift_t, high_bits_t, x_t, x_i_t = \
                signature.args
            acc_a, acc_i, w_a, low_i, low_shift, low_bits, high_i, high_shift, high_bits, x_a, x_i = args
            low = _low_bits(context, builder, _load(context, builder, w_t, w_a, low_i_t, low_i, 32), low_shift,
                            low_shift_t, low_bits, low_bits_t)
            high = _bits_moved(context, builder, _load(context, builder, w_t, w_a, high_i_t, high_i, 32), high_shift,
                               high_shift_t, high_bits, high_bits_t, low_bits, low_bits_t)
            q = builder.or_(low, high)
            xq = _load(context, builder, x_t, x_a, x_i_t, x_i, 4)
            if partial and _host_has_avx2():
                _accumulate(context, builder, acc_t, acc_a, acc_i_t, acc_i, _byte_pair_sums(builder, q, xq))
            else:
                _dot4_into(context, builder, acc_t, acc_a, acc_i_t, acc_i, q, xq, signed=False)
            return context.get_dummy_value()
        return (types.void(acc, acc_index, w, low_index, low_shift, low_bits, high_index, high_shift, high_bits, x,
                           x_index), codegen)
    typer.__name__ = typer.__qualname__ = "dot4_bits_partial" if partial else "dot4_bits"   # numba names it so
    return typer


dot4_bits = intrinsic(_dot4_bits_intrinsic(partial=False))
dot4_bits.__doc__ = """dot4_bits(acc, acc_index, w, low_index, low_shift, low_bits, high_index, high_shift, high_bits,
x, x_index): as dot4_int8 for weights split in two bit fields (unsigned, before the format's
offset, which the caller applies to the sum): `low_bits` bits at bit `low_shift` of the quad at
low_index, and above them `high_bits` bits at bit `high_shift` of the quad at high_index.
Q6_K: 4 + 2 bits. Summed into int32."""
dot4_bits_partial = intrinsic(_dot4_bits_intrinsic(partial=True))
dot4_bits_partial.__doc__ = """As dot4_bits, into partial sums that scaled_sums finishes (as dot4_partial's: int16 pairs
with AVX2): for values below 32, at most 4 calls per partial sum
(4 * 2 * 31 * 127 < 2^15). Q5_K: 4 + 1 bits; Q3_K: 2 + 1."""


@intrinsic
def dot4_nibbles_fifth_bit(typingctx, acc, acc_index, w, low_index, low_shift, high_index, bit, x, x_index):
    """As dot4_bits for Q5_0 / Q5_1: the nibble at bit `low_shift` of the quad at low_index,
    plus 16 times bit `bit + c` of the lane's 32-bit word at high_index for its byte c (the
    block's qh, one bit per weight: 4 weights' bits are 4 consecutive bits of the word, spread
    to their bytes by one multiply, t * 0x00204081 placing bit c of t at bit 8 c). 0..31,
    summed into int32."""
    if not (_dot4_types_ok(acc, w, x) and isinstance(low_shift, types.Integer) and isinstance(bit, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        acc_t, acc_i_t, w_t, low_i_t, low_shift_t, high_i_t, bit_t, x_t, x_i_t = signature.args
        acc_a, acc_i, w_a, low_i, low_shift, high_i, bit, x_a, x_i = args
        bytes32, ints8 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(32), 8)
        low = _nibbles(context, builder, _load(context, builder, w_t, w_a, low_i_t, low_i, 32), low_shift, low_shift_t)
        words = builder.bitcast(_load(context, builder, w_t, w_a, high_i_t, high_i, 32), ints8)
        def splat(value):
            return ir.Constant(ints8, [value] * 8)
        four = builder.and_(builder.lshr(words, _splat(context, builder, ints8, bit, bit_t)), splat(15))
        spread = builder.and_(builder.mul(four, splat(0x00204081)), splat(0x01010101))
        q = builder.or_(low, builder.bitcast(builder.shl(spread, splat(4)), bytes32))
        _dot4_into(context, builder, acc_t, acc_a, acc_i_t, acc_i, q, _load(context, builder, x_t, x_a, x_i_t, x_i, 4),
                   signed=False)
        return context.get_dummy_value()
    return types.void(acc, acc_index, w, low_index, low_shift, high_index, bit, x, x_index), codegen


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)   # ggml's kvalues_iq4nl


@intrinsic
def dot4_codebook(typingctx, acc, acc_index, w, w_index, shift, x, x_index):
    """As dot4_int8 for IQ4_NL / IQ4_XS: the nibble at bit `shift` of each byte indexes the
    16 int8 values of IQ4_VALUES, looked up 32 at a time by one byte shuffle (pshufb) with
    AVX2, then multiplied as signed int8 weights, summed into int32."""
    if not (_dot4_types_ok(acc, w, x) and isinstance(shift, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        acc_t, acc_i_t, w_t, w_i_t, shift_t, x_t, x_i_t = signature.args
        acc_a, acc_i, w_a, w_i, shift, x_a, x_i = args
        bytes32 = ir.VectorType(ir.IntType(8), 32)
        nibbles = _nibbles(context, builder, _load(context, builder, w_t, w_a, w_i_t, w_i, 32), shift, shift_t)
        table = ir.Constant(bytes32, [v & 0xFF for v in IQ4_VALUES] * 2)
        if _host_has_avx2():
            shuffle = _declare(builder, "llvm.x86.avx2.pshuf.b", bytes32, bytes32, bytes32)
            values = builder.call(shuffle, [table, nibbles])
        else:   # 16 selects: plain LLVM vector code
            values = ir.Constant(bytes32, [0] * 32)
            for k, v in enumerate(IQ4_VALUES):
                values = builder.select(builder.icmp_unsigned("==", nibbles, ir.Constant(bytes32, [k] * 32)),
                                        ir.Constant(bytes32, [v & 0xFF] * 32), values)
        _dot4_into(context, builder, acc_t, acc_a, acc_i_t, acc_i, values,
                   _load(context, builder, x_t, x_a, x_i_t, x_i, 4), signed=True)
        return context.get_dummy_value()
    return types.void(acc, acc_index, w, w_index, shift, x, x_index), codegen
