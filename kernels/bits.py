"""LLVM features numba lacks: half-precision conversions, a prefetch hint, stack arrays.

numba has no float16 type on the CPU. The conversions reinterpret uint16 bit patterns with
LLVM's own `half` type, so LLVM emits the hardware conversion (vcvtph2ps with F16C) and can
vectorize loops that use them.
"""
import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def f16_to_f32(typingctx, bits):
    """uint16 bits of an IEEE half -> float32 (exact)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@njit(inline="always")
def half_at_bytes(row, offset):
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
    on every step. Stack memory cannot alias the arguments, so LLVM keeps it in registers
    (measured: Q4_K GEMV from L3, 2 threads, 12.8 -> 18.6 GB/s)."""
    return carray(_stack_pointer(dtype, rows, columns), rows * columns)
