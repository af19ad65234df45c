"""How channels move through attention: batched matmul, scaled_dot_product_attention
and masked_fill, the ops of hand-written and library attention.

After ``view(B, L, -1, head_dim)`` the channels of a q/k/v projection are
tracked per head (the reshape rule makes each head one unit of ``head_dim``
channels, see ``rules.reshape_via_probe``): the head dim is then a batch dim
of the attention matmuls, so q, k and v heads are coupled position by position
and a head is pruned as a whole. Grouped-query attention (``enable_gqa`` or K/V
repeated by ``repeat_interleave`` / ``expand``) is analysed in one of
``GQA_MODES``: ``"kv"`` (the default) couples a KV head with the query heads that
read it, so a unit is a KV head and its Hq / Hkv query heads; ``"query"`` keeps
the KV heads and prunes query heads one by one, with the same number kept for
every KV head (``ChannelGroup.blocks``). A KV head is recognised as shared when
the per-query-head operand of the product lists the same element at several
heads; attention without sharing (Hq == Hkv) is coupled head by head in both modes.

Masked values (``Analyzer.dirt``): attention is linear in V, so a head whose V
is zero outputs zero whatever its scores; a matmul with one clean factor is
clean. The uniform softmax of a masked head's zero scores is therefore harmless.
"""

from __future__ import annotations

import numpy as np

from .layouts import TensorMeta, Tracked, Untracked, is_tensor_layout
from .optable import describe_at as _what, get_arg

GQA_MODES = ("kv", "query")
# why gqa="query" leaves the key/value projections' heads alone
KEPT_KV_HEADS = ("gqa='query' keeps the key/value heads of grouped-query attention "
                 "(only the query heads that read them are pruned)")
# a masked query head's scores are zero, its softmax uniform: it outputs the mean of a V that is kept
KEPT_KV_HEAD_READ = "a masked query head still attends to its kept key/value head (its output is not zero)"


def checked_gqa(gqa) -> str:
    """``gqa`` if it is one of GQA_MODES, else a ValueError naming it."""
    if not isinstance(gqa, str) or gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {', '.join(map(repr, GQA_MODES))} (what a key/value head shared by "
                         f"several query heads is pruned with), got {gqa!r}")
    return gqa


def _reads_shared_kv(an, query: np.ndarray, kv: np.ndarray) -> bool:
    """With gqa="query", when query head ``p`` reads KV head ``kv[p]`` and some KV head
    is read by several query heads: records the reads (``Analyzer.read_shared_kv``)
    and returns True, and the caller must not couple the heads. False otherwise."""
    if an.gqa != "query" or len(np.unique(kv)) == len(kv) or len(np.unique(query)) != len(query):
        return False
    an.read_shared_kv(query, kv)
    return True


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
        if len(placed) == 2:
            shared = _product_with_shared_kv(an, a, b, out_dim, meta)
            if shared is not None:
                return shared
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


def _product_with_shared_kv(an, a: Tracked, b: Tracked, out_dim: int, meta) -> Tracked | None:
    """``q @ k^T`` or ``weights @ v`` over heads, where one factor holds repeated KV
    heads, with gqa="query": the output carries the query heads, not coupled to
    the KV heads. None when that is not the case (the caller couples the heads)."""
    if an.gqa != "query" or a.size != meta.shape[out_dim] or b.size != meta.shape[out_dim]:
        return None  # the default mode, or broadcast over the heads
    query, kv = (a, b) if len(np.unique(b.ids)) < len(b.ids) else (b, a)
    if not _reads_shared_kv(an, query.ids, kv.ids):
        return None
    out = Tracked(out_dim, query.ids, meta.shape)
    an.elements.mark_attention(query.ids)
    an.absorb(kv)  # the KV heads are never masked in this mode
    if an.dirt(query):  # a masked query head's row is not zero, and the kept KV factor does not zero it
        an.carry(query, out)
        an.soil(out, KEPT_KV_HEAD_READ)
    else:
        an.absorb(query)  # zero query rows give zero rows, whatever the KV factor holds
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
    so a KV head and its query heads are one unit (gqa="kv"), or the query heads
    read kept KV heads (gqa="query", see ``_reads_shared_kv``). A mask with one
    slice per head is fixed to the head count and blocks the heads."""
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
    kv_of_query = np.repeat(k.ids, q.size // k.size)  # query head p reads KV head p // repeat
    shared_kv = _reads_shared_kv(an, q.ids, kv_of_query)
    if not shared_kv:
        an.elements.union_arrays(q.ids, kv_of_query)
    if isinstance(mask, Tracked):
        return an.unknown(node, (q, k, v, mask), meta, f"{what} with a mask computed from the channels")
    if isinstance(mask, Untracked) and len(mask.shape) >= 3 and mask.shape[-3] == q.size > 1:
        an.elements.block(q.ids, f"{what} has an attention mask with one slice per head "
                                 "(fixed to the head count)")
    out = Tracked(len(meta.shape) - 3, q.ids, meta.shape)
    an.elements.mark_attention(q.ids)
    an.absorb((q, k, mask))  # the output is linear in v: a zero V head gives a zero output
    an.carry(v, out)
    if shared_kv:  # ... but a masked query head reads a V that is kept
        an.soil(out, KEPT_KV_HEAD_READ)
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
