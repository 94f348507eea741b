"""Kernels for short vectors (length <= 32) written as LLVM vector code, eight vectors at a time.

For short vectors the generic per-vector loops (``_kernels.plain_sums``) compile to scalar code: LLVM vectorizes
them 16 entries at a time, so a length-9 vector never reaches the vector loop and every entry costs about 9 scalar
instructions (1.1 ns an entry against 0.3 for length 1000, docs/projection.md §8); lengths 17-32 ran mostly
scalar too (a pass over length 17 cost 2.2x one over length 16). Here each vector is one to four masked loads of 8
lanes (lanes past the vector's end read as 0 and are never touched in memory), the lanes are processed as vectors,
and the per-vector sums of eight vectors come out of one transposing add tree, so there is no horizontal reduction
per vector.

Every sum is added in an order fixed by this code (the tree below), with plain IEEE instructions and no fastmath
flags: the bits do not depend on LLVM's choices, on the CPU, or on whether Numba compiled or loaded the caller
(``_kernels``). A zero lane adds an exact 0, so the sums are those of the vector's own entries, reordered.
"""

from __future__ import annotations

import llvmlite
import numba as nb
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba.core import types as nbt
from numba.extending import intrinsic

SHORT_MAX = 32  # vectors up to this length take these kernels (1 to 4 loads of _H lanes each)
_H = 8  # lanes of one load (a 512-bit register of doubles)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F64 = ir.DoubleType()
_V64 = ir.VectorType(_F64, _H)


# Pointers are built typed (<8 x float>*), which every llvmlite prints in a form its LLVM parses; an intrinsic's
# name carries its pointer type: p0v8f32 while LLVM has typed pointers (numba <= 0.61, LLVM 15), p0 once opaque.
_OPAQUE = llvm_version_info[0] >= 17 or getattr(llvmlite, "opaque_pointers_enabled", False)


def _vname(is32):
    return f"v{_H}{'f32' if is32 else 'f64'}"


def _pname(is32):
    return "p0" if _OPAQUE else "p0" + _vname(is32)


def _fn(builder, name, ret, args):
    mod = builder.module
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _splat(builder, val, ty):
    v = builder.insert_element(ir.Constant(ty, ir.Undefined), val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, _H), [0] * _H))


def _shuf(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), idx))


def _masks(builder, n, halves):
    """(lanes 0-7 below n, lanes 8-15 below n, ...) as <8 x i1>, one per load."""
    nv = _splat(builder, n, ir.VectorType(_I64, _H))
    return [builder.icmp_signed("<", ir.Constant(ir.VectorType(_I64, _H), list(range(h, h + _H))), nv)
            for h in range(0, halves * _H, _H)]


def _tree(builder, vs):
    """The lanes' sum of one vector's loads in a fixed order: pairs, then pairs of pairs ((a + b) for two loads,
    (a + b) + c for three, (a + b) + (c + d) for four)."""
    while len(vs) > 1:
        vs = [builder.fadd(a, b) for a, b in zip(vs[0::2], vs[1::2])] + vs[len(vs) - len(vs) % 2 :]
    return vs[0]


def _load(builder, arr_ty, data, off, mask, halves):
    """Entries off .. off + 8 halves - 1 under the masks, widened to doubles (exact), one <8 x double> per half."""
    is32 = arr_ty.dtype == nbt.float32
    elt = ir.FloatType() if is32 else _F64
    vty = ir.VectorType(elt, _H)
    mty = ir.VectorType(ir.IntType(1), _H)
    pty = vty.as_pointer()
    load = _fn(builder, f"llvm.masked.load.{_vname(is32)}.{_pname(is32)}", vty, [pty, _I32, mty, vty])
    out = []
    for h in range(halves):
        ptr = builder.bitcast(builder.gep(data, [builder.add(off, ir.Constant(_I64, h * _H))]), pty)
        v = builder.call(load, [ptr, ir.Constant(_I32, 4 if is32 else 8), mask[h], ir.Constant(vty, None)])
        out.append(builder.fpext(v, _V64) if is32 else v)
    return out


def _transpose_sum(builder, vs):
    """Eight <8 x double> (vector q's lanes in vs[q]) -> one <8 x double> whose lane q is the sum of vs[q]'s lanes:
    three levels of pairing halves, so every vector's lanes are added in the same fixed tree."""
    lvl = []
    for a, b in zip(vs[0::2], vs[1::2]):  # [a 0-3 | b 0-3] + [a 4-7 | b 4-7]
        lvl.append(builder.fadd(_shuf(builder, a, b, [0, 1, 2, 3, 8, 9, 10, 11]),
                                _shuf(builder, a, b, [4, 5, 6, 7, 12, 13, 14, 15])))
    nxt = []  # lanes: [q0 (2), q2 (2), q1 (2), q3 (2)] of each pair of pairs
    for a, b in zip(lvl[0::2], lvl[1::2]):
        nxt.append(builder.fadd(_shuf(builder, a, b, [0, 1, 8, 9, 4, 5, 12, 13]),
                                _shuf(builder, a, b, [2, 3, 10, 11, 6, 7, 14, 15])))
    a, b = nxt  # -> lanes [q0, q4, q2, q6, q1, q5, q3, q7]
    w = builder.fadd(_shuf(builder, a, b, [0, 8, 2, 10, 4, 12, 6, 14]), _shuf(builder, a, b, [1, 9, 3, 11, 5, 13, 7, 15]))
    return _shuf(builder, w, w, [0, 4, 2, 6, 1, 5, 3, 7])


def _sums8(context, builder, sig, args, halves, modes):
    """Per-vector (support size, sum u, sum u^2) of the eight vectors of length n <= 8 halves starting at o0,
    o0 + n, ..., stored at M[q .. q + 7], SU[..], SUU[..]: one such set of arrays per entry of ``modes``, u = |x|
    for True (NaN shows in the sums, the support counts nonzeros), u = (|x| - t)_+ for False. Sets share the
    loads (the first pass also evaluates at a threshold, ``_uniform_passes``), each computed with the operations
    it has alone, so the same bits."""
    x_ty, m_ty = sig.args[0], sig.args[4]
    x = context.make_array(x_ty)(context, builder, args[0])
    o0, n, q = args[1], args[2], args[-1]
    mask = _masks(builder, n, halves)
    zero = ir.Constant(_V64, None)
    tv = _splat(builder, args[3], _V64)
    fabs = _fn(builder, f"llvm.fabs.v{_H}f64", _V64, [_V64])
    ctpop = _fn(builder, "llvm.ctpop.i8", ir.IntType(8), [ir.IntType(8)])
    acc = [([], [], []) for _ in modes]
    for k in range(8):
        off = builder.add(o0, builder.mul(n, ir.Constant(_I64, k)))
        avs = [builder.call(fabs, [v]) for v in _load(builder, x_ty, x.data, off, mask, halves)]
        for absolute, (su, suu, cnt) in zip(modes, acc):
            us, c = [], ir.Constant(_I32, 0)
            for a in avs:
                if absolute:
                    pos, u = builder.fcmp_ordered(">", a, zero), a
                else:
                    d = builder.fsub(a, tv)
                    pos = builder.fcmp_ordered(">", d, zero)
                    u = builder.select(pos, d, zero)
                us.append(u)
                c = builder.add(c, builder.zext(builder.call(ctpop, [builder.bitcast(pos, ir.IntType(8))]), _I32))
            sq = [builder.fmul(u, u) for u in us]
            su.append(_tree(builder, us))
            suu.append(_tree(builder, sq))
            cnt.append(builder.uitofp(c, _F64))
    for i, (su, suu, cnt) in enumerate(acc):
        m_arg, su_arg, suu_arg = args[4 + 3 * i : 7 + 3 * i]
        for arg, val in ((su_arg, _transpose_sum(builder, su)), (suu_arg, _transpose_sum(builder, suu))):
            arr = context.make_array(m_ty)(context, builder, arg)
            builder.store(val, builder.bitcast(builder.gep(arr.data, [q]), _V64.as_pointer()), align=8)
        marr = context.make_array(m_ty)(context, builder, m_arg)
        for k in range(8):
            builder.store(cnt[k], builder.gep(marr.data, [builder.add(q, ir.Constant(_I64, k))]))
    return context.get_dummy_value()


def _by_loads(context, builder, sig, args, modes):
    """A switch on the vectors' number of 8-lane loads (n <= 8: one, up to 4) into ``_sums8`` compiled for each."""
    fn = builder.function
    blocks = [fn.append_basic_block(f"sums8_loads{h}") for h in range(1, SHORT_MAX // _H + 1)]
    end = fn.append_basic_block("sums8_end")
    loads = builder.sdiv(builder.add(args[2], ir.Constant(_I64, _H - 1)), ir.Constant(_I64, _H))
    sw = builder.switch(loads, blocks[0])
    for h, bb in enumerate(blocks, 1):
        sw.add_case(ir.Constant(_I64, h), bb)
        builder.position_at_end(bb)
        _sums8(context, builder, sig, args, h, modes)
        builder.branch(end)
    builder.position_at_end(end)
    return context.get_dummy_value()


@intrinsic
def sums8(typingctx, x, o0, n, t, M, SU, SUU, q):
    """(support size, sum u, sum u^2) of u = (|x| - t)_+ for the eight vectors of length n <= SHORT_MAX from o0,
    into M, SU, SUU at q .. q + 7."""
    sig = nbt.void(x, nbt.int64, nbt.int64, nbt.float64, M, SU, SUU, nbt.int64)
    return sig, lambda context, builder, sig, args: _by_loads(context, builder, sig, args, (False,))


@intrinsic
def _abs8(typingctx, x, o0, n, t, M, SU, SUU, q):
    sig = nbt.void(x, nbt.int64, nbt.int64, nbt.float64, M, SU, SUU, nbt.int64)
    return sig, lambda context, builder, sig, args: _by_loads(context, builder, sig, args, (True,))


@nb.njit(inline="always")
def abs_sums8(x, o0, n, M, SU, SUU, q):
    """``sums8`` of u = |x| (nonzeros counted; NaN and Inf show in the sums)."""
    _abs8(x, o0, n, 0.0, M, SU, SUU, q)


@intrinsic
def both8(typingctx, x, o0, n, t, M, SU, SUU, M2, SU2, SUU2, q):
    """``abs_sums8`` into M, SU, SUU and ``sums8`` at t into M2, SU2, SUU2 from one set of loads (the same bits)."""
    sig = nbt.void(x, nbt.int64, nbt.int64, nbt.float64, M, SU, SUU, M2, SU2, SUU2, nbt.int64)
    return sig, lambda context, builder, sig, args: _by_loads(context, builder, sig, args, (True, False))


def _write8_n(builder, x_ty, xd, od, o0, n, tv, sc8, is32_out):
    """Eight consecutive vectors of a fixed length n written as n groups of eight consecutive entries: full loads
    and stores (no masks, no line-splitting partial stores), each lane's scale picked from sc8 by a constant
    shuffle (lane 8g + l belongs to vector (8g + l) // n)."""
    zero = ir.Constant(_V64, None)
    fabs = _fn(builder, f"llvm.fabs.v{_H}f64", _V64, [_V64])
    copysign = _fn(builder, f"llvm.copysign.v{_H}f64", _V64, [_V64, _V64])
    is32 = x_ty.dtype == nbt.float32
    ity = ir.VectorType(ir.FloatType() if is32 else _F64, _H)
    oty = ir.VectorType(ir.FloatType() if is32_out else _F64, _H)
    for g in range(n):
        off = builder.add(o0, ir.Constant(_I64, g * _H))
        v = builder.load(builder.bitcast(builder.gep(xd, [off]), ity.as_pointer()), align=4 if is32 else 8)
        if is32:
            v = builder.fpext(v, _V64)
        scl = _shuf(builder, sc8, sc8, [(g * _H + lane) // n for lane in range(_H)])
        d = builder.fsub(builder.call(fabs, [v]), tv)
        r = builder.select(builder.fcmp_ordered(">", d, zero), builder.fmul(d, scl), zero)
        w = builder.call(copysign, [r, v])  # x's sign bit on every entry, -0.0 and zeroed entries included
        if is32_out:
            w = builder.fptrunc(w, oty)
        builder.store(w, builder.bitcast(builder.gep(od, [off]), oty.as_pointer()), align=4 if is32_out else 8)


@intrinsic
def write8(typingctx, x, out, o0, n, t, SC, q):
    """out[o0 : o0 + 8 n] = the eight vectors from o0 projected at t with scales SC[q .. q + 7], with the operations
    of ``_uniform_passes._write_block``'s scalar loop, so its bits (a zero's sign included), for 1 <= n <= SHORT_MAX:
    a switch on n into code compiled for each length."""
    sig = nbt.void(x, out, nbt.int64, nbt.int64, nbt.float64, SC, nbt.int64)

    def codegen(context, builder, sig, args):
        x_ty, o_ty, sc_ty = sig.args[0], sig.args[1], sig.args[5]
        xd = context.make_array(x_ty)(context, builder, args[0]).data
        od = context.make_array(o_ty)(context, builder, args[1]).data
        scd = context.make_array(sc_ty)(context, builder, args[5]).data
        o0, n = args[2], args[3]
        tv = _splat(builder, args[4], _V64)
        sc8 = builder.load(builder.bitcast(builder.gep(scd, [args[6]]), _V64.as_pointer()), align=8)
        fn = builder.function
        end = fn.append_basic_block("write8_end")
        sw = builder.switch(n, end)
        for k in range(1, SHORT_MAX + 1):
            bb = fn.append_basic_block(f"write8_n{k}")
            sw.add_case(ir.Constant(_I64, k), bb)
            builder.position_at_end(bb)
            _write8_n(builder, x_ty, xd, od, o0, k, tv, sc8, o_ty.dtype == nbt.float32)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()
    return sig, codegen
