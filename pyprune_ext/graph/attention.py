"""How channels move through attention: batched matmul, scaled_dot_product_attention
and masked_fill, the ops of hand-written and library attention.

After ``view(B, L, -1, head_dim)`` the channels of a q/k/v projection are
tracked per head (the reshape rule makes each head one unit of ``head_dim``
channels, see ``rules.reshape_via_probe``): the head dim is then a batch dim
of the attention matmuls, so q, k and v heads are coupled position by position
and a head is pruned as a whole. Grouped-query attention couples a KV head with
the query heads that read it (``enable_gqa`` or K/V repeated by
``repeat_interleave`` / ``expand``).

Masked values (``Analyzer.dirt``): attention is linear in V, so a head whose V
is zero outputs zero whatever its scores; a matmul with one clean factor is
clean. The uniform softmax of a masked head's zero scores is therefore harmless.
"""

from __future__ import annotations

import numpy as np

from .layouts import TensorMeta, Tracked, Untracked, is_tensor_layout
from .optable import describe_at as _what, get_arg


def _out_dim_of_matmul(operand: Tracked, which: str, out_nd: int) -> int | None:
    """Where operand ``which`` ("a" or "b") of ``a @ b`` puts its tracked dim in the
    output, or None when it is contracted (a's last dim, b's second to last)."""
    nd, d = len(operand.shape), operand.dim
    if d == nd - 1:
        return out_nd - 1 if which == "b" else None
    if d == nd - 2:
        return out_nd - 2 if which == "a" else None
    return d + out_nd - nd  # a batch dim, aligned from the right


def matmul(an, node, name, swapped, args, kwargs, meta):
    """``a @ b`` (matmul, bmm): channels on a batch dim pass (heads: both factors'
    heads are coupled), a's rows and b's columns pass; a contraction over the
    channels mixes them (blocked: there is no layer whose weights would shrink)."""
    a = args[0] if args else get_arg(args, kwargs, 0, ("input",))
    b = get_arg(args, kwargs, 1, ("other", "mat2"))
    if swapped:
        a, b = b, a
    what = _what(node)
    if not (is_tensor_layout(a) and is_tensor_layout(b)) or not isinstance(meta, TensorMeta) \
            or min(len(a.shape), len(b.shape)) < 2:
        return an.unknown(node, (args, kwargs), meta)
    out_nd = len(meta.shape)
    placed = {}
    for which, operand in (("a", a), ("b", b)):
        if isinstance(operand, Tracked):
            dim = _out_dim_of_matmul(operand, which, out_nd)
            if dim is None:
                return an.unknown(node, (a, b), meta, f"{what} contracts over the channels")
            placed[which] = (operand, dim)
    dims = {dim for _, dim in placed.values()}
    if len(dims) > 1:
        return an.unknown(node, (a, b), meta, f"{what} puts the channels of its two factors on different dims")
    out_dim = dims.pop()
    if out_dim == out_nd - 2:
        sharing = [a]  # a's rows: b has no such dim
    elif out_dim == out_nd - 1:
        sharing = [b]  # b's columns
    else:
        sharing = [a, b]  # a batch dim: both factors carry it, unless broadcast (one weight for every head)
    ref = None
    for operand in sharing:
        own = out_dim - (out_nd - len(operand.shape))
        if own < 0 or (operand.shape[own] == 1 and meta.shape[out_dim] != 1):
            continue
        ids = an.channels_in(operand, own, what)
        if ref is None:
            ref = ids
        else:
            an.elements.union_arrays(ref, ids)
    out = Tracked(out_dim, ref, meta.shape)
    if len(sharing) == 2 and len(placed) == 2:  # both factors carry the heads: q @ k^T, weights @ v
        an.elements.mark_attention(ref)
    _bilinear_dirt(an, [v for v, _ in placed.values()], out)
    return out


def _bilinear_dirt(an, factors: list[Tracked], out) -> None:
    """A product is zero where one factor is: clean if any tracked factor is clean."""
    if any(not an.dirt(f) for f in factors):
        an.absorb(factors)
    else:
        an.carry(factors, out)


def scaled_dot_product_attention(an, node, name, swapped, args, kwargs, meta):
    """F.scaled_dot_product_attention(q, k, v, attn_mask, ...): q, k and v carry
    heads on dim -3; query head h reads KV head h // (Hq // Hkv) (``enable_gqa``),
    so a KV head and its query heads are one unit. A mask with one slice per head
    is fixed to the head count and blocks the heads."""
    q, k, v = (get_arg(args, kwargs, i, (n,)) for i, n in enumerate(("query", "key", "value")))
    mask = get_arg(args, kwargs, 3, ("attn_mask",))
    what = _what(node)
    if not all(isinstance(t, Tracked) for t in (q, k, v)) or not isinstance(meta, TensorMeta):
        return an.unknown(node, (args, kwargs), meta, f"{what} with an input that carries no heads")
    if any(t.dim != len(t.shape) - 3 for t in (q, k, v)):
        return an.unknown(node, (q, k, v), meta, f"{what}: the channels are not on the head dim (-3)")
    if k.size != v.size or q.size % k.size:
        return an.unknown(node, (q, k, v), meta, f"{what}: {q.size} query heads for {k.size} key heads")
    an.elements.union_arrays(k.ids, v.ids)
    repeat = q.size // k.size
    an.elements.union_arrays(q.ids, np.repeat(k.ids, repeat))  # query head p reads KV head p // repeat
    if isinstance(mask, Tracked):
        return an.unknown(node, (q, k, v, mask), meta, f"{what} with a mask computed from the channels")
    if isinstance(mask, Untracked) and len(mask.shape) >= 3 and mask.shape[-3] == q.size > 1:
        an.elements.block(q.ids, f"{what} has an attention mask with one slice per head "
                                 "(fixed to the head count)")
    out = Tracked(len(meta.shape) - 3, q.ids, meta.shape)
    an.elements.mark_attention(q.ids)
    an.absorb((q, k, mask))  # the output is linear in v: a zero V head gives a zero output
    an.carry(v, out)
    return out


def masked_fill(an, node, name, swapped, args, kwargs, meta):
    """x.masked_fill(mask, value): the mask must not hold one slice per channel
    (it could not shrink); a non-zero value is written into pruned channels too."""
    x = args[0] if args else get_arg(args, kwargs, 0, ("input",))
    mask, value = get_arg(args, kwargs, 1, ("mask",)), get_arg(args, kwargs, 2, ("value",))
    what = _what(node)
    if not isinstance(x, Tracked) or is_tensor_layout(value) or not isinstance(meta, TensorMeta):
        return an.unknown(node, (args, kwargs), meta)
    out, _ = an.couple_elementwise([x, mask], meta.shape, what)
    an.carry(x, out)
    if value != 0:
        an.soil(out, f"{what} writes {value!r} into the channels")
    return out
