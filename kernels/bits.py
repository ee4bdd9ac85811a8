"""Half-precision conversions as LLVM intrinsics, so kernels can read f16 and bf16 storage.

numba has no float16 type on the CPU. These helpers reinterpret uint16 bit patterns with
LLVM's own `half` type, so LLVM emits the hardware conversion (vcvtph2ps with F16C) and can
vectorize loops that use them.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def f16_to_f32(typingctx, bits):
    """uint16 bits of an IEEE half -> float32 (exact)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


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
