"""Channel elements and the layouts of traced tensors.

Every prunable channel a layer produces is one *element* (an integer id). A
traced tensor whose dim ``dim`` carries such channels is ``Tracked``: position
``p`` along that dim holds element ``ids[p]`` (concat, split and flatten are
index maps on ``ids``). Ops that tie channels together (a residual add, a
module called twice) union the elements; the connected components, bundled by
``groups.bundle``, become the channel groups. Working at single-channel
granularity keeps concat/split/flatten exact without special-casing offsets.

Components also collect *blocked* reasons (the channels cannot be removed) and
*inexact* reasons (zeroing them is not equivalent to removing them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Tracked:
    """A tensor of ``shape`` whose dim ``dim`` carries the channel elements ``ids``."""

    dim: int
    ids: np.ndarray
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(self.shape[self.dim])


@dataclass(frozen=True, eq=False)
class Untracked:
    """A tensor carrying no prunable channels (model input, constant, output of
    an op we could not follow). ``source`` says where it comes from, for reasons."""

    source: str
    shape: tuple[int, ...]
    # the qualified name of the parameter or buffer this is, when the model reads it directly
    attribute: str | None = None


@dataclass(frozen=True)
class TensorMeta:
    """What the recording run keeps of a tensor value."""

    shape: tuple[int, ...]
    dtype: object


def is_tensor_layout(value) -> bool:
    return isinstance(value, (Tracked, Untracked))


def iter_layouts(value):
    """Every Tracked/Untracked inside a (nested) tuple/list/dict value."""
    if is_tensor_layout(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_layouts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_layouts(item)


@dataclass
class Elements:
    """Union-find over channel elements, with members and reasons per component."""

    parent: list[int] = field(default_factory=list)
    blocked: dict[int, dict[str, None]] = field(default_factory=dict)
    inexact: dict[int, dict[str, None]] = field(default_factory=dict)
    # norms whose statistics must skip masked channels for masking to be exact: root -> {norm: reason}
    renorm: dict[int, dict[str, str]] = field(default_factory=dict)
    residual: set[int] = field(default_factory=set)
    attention: set[int] = field(default_factory=set)  # components that are attention heads
    # components whose masked values are not zero but only reach layers' input columns, which
    # masking then zeroes too (query heads reading a kept KV head, gqa="query")
    zeroes_inputs: set[int] = field(default_factory=set)
    # (module name, role, position along the module axis) -> element
    members: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def new(self, count: int, blocked: str | None = None) -> np.ndarray:
        """``count`` fresh elements, optionally blocked with a reason."""
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        ids = np.arange(start, start + count, dtype=np.int64)
        if blocked is not None:
            self.block(ids, blocked)
        return ids

    def find(self, e: int) -> int:
        parent = self.parent
        root = e
        while parent[root] != root:
            root = parent[root]
        while parent[e] != root:  # path compression
            parent[e], e = root, parent[e]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return ra
        if rb < ra:  # keep the older element as root: groups sort by creation order
            ra, rb = rb, ra
        self.parent[rb] = ra
        for table in (self.blocked, self.inexact, self.renorm):
            if rb in table:
                table.setdefault(ra, {}).update(table.pop(rb))
        for flagged in (self.residual, self.attention, self.zeroes_inputs):
            if rb in flagged:
                flagged.discard(rb)
                flagged.add(ra)
        return ra

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couples ``a[p]`` with ``b[p]`` for every position ``p``."""
        if len(a) != len(b):
            raise AssertionError(f"internal error: coupling {len(a)} with {len(b)} channels")
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.union(x, y)

    def _mark(self, table: dict, ids, reason: str) -> None:
        for root in {self.find(int(e)) for e in np.asarray(ids).tolist()}:
            table.setdefault(root, {})[reason] = None

    def block(self, ids, reason: str) -> None:
        """The components of ``ids`` cannot be pruned, because of ``reason``."""
        self._mark(self.blocked, ids, reason)

    def mark_inexact(self, ids, reason: str) -> None:
        """Zeroing the components of ``ids`` is not the same as removing them."""
        self._mark(self.inexact, ids, reason)

    def mark_renorm(self, ids, norm: str, reason: str) -> None:
        """Zeroing the components of ``ids`` equals removing them once norm module
        ``norm`` takes its statistics over the kept channels only."""
        for root in {self.find(int(e)) for e in np.asarray(ids).tolist()}:
            self.renorm.setdefault(root, {})[norm] = reason

    def mark_residual(self, ids) -> None:
        for e in np.asarray(ids).tolist():
            self.residual.add(self.find(int(e)))

    def mark_attention(self, ids) -> None:
        """The components of ``ids`` are attention heads (their Taylor gate is the
        input of the layer that consumes the heads' output)."""
        for e in np.asarray(ids).tolist():
            self.attention.add(self.find(int(e)))

    def mark_zeroes_inputs(self, ids) -> None:
        """Masking the components of ``ids`` must also zero their consumers' input columns."""
        for e in np.asarray(ids).tolist():
            self.zeroes_inputs.add(self.find(int(e)))

    def attach(self, name: str, role: str, ids: np.ndarray) -> None:
        """Module ``name``'s axis ``role`` position ``p`` carries element ``ids[p]``.
        A module seen twice (called twice, or shared) couples both uses."""
        for position, e in enumerate(ids.tolist()):
            key = (name, role, position)
            known = self.members.get(key)
            if known is None:
                self.members[key] = e
            elif known != e:
                self.union(known, e)

    def module_elements(self, name: str) -> list[int]:
        return [e for (n, _, _), e in self.members.items() if n == name]
