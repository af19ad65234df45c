"""The records the dependency analysis hands out: members, gates, channel groups."""

from __future__ import annotations

from dataclasses import dataclass, field

class GraphAnalysisWarning(UserWarning):
    """Issued when the analysis meets an op it does not understand (its channels
    become unprunable) or has to fall back from torch.fx to execution tracing."""


@dataclass(frozen=True)
class Member:
    """One module axis that a channel group runs through.

    ``role`` names one of the module's axes in its layer spec
    (:mod:`pyprune_ext.graph.specs`): ``"out"`` (channels the layer produces:
    Conv/Linear output channels), ``"in"`` (channels it consumes),
    ``"norm"`` (a normalisation's channels), ``"depthwise"`` (a conv with
    groups == in_channels == out_channels: input, output and groups shrink
    together) or ``"channel"`` (per-channel parameters such as PReLU's).

    Group channel ``i`` is module channel ``offset + i``; with ``span > 1``
    it is the module positions ``(offset + i) * span`` .. ``(offset + i + 1) *
    span - 1``: a Linear after flattening (C, H, W) (span = H*W), or a unit
    of channels that goes as a whole (a grouped conv's group, a GroupNorm group).
    """

    name: str
    role: str
    offset: int
    span: int = 1
    dim: int | None = None  # role "tensor": the dim of the tensor ``name`` that carries the channels

    def positions(self, channel: int) -> range:
        """The module features (along this member's axis) of group channel ``channel``."""
        start = (self.offset + channel) * self.span
        return range(start, start + self.span)


@dataclass(frozen=True)
class Gate:
    """Where a group's channels can be observed: output channels ``offset`` ..
    ``offset + size - 1`` of module ``name``'s forward output, along
    ``channel_dim`` (1 for (N, C, ...) conv/BatchNorm outputs, -1 for
    Linear/LayerNorm outputs). ``producer`` is the conv/linear that computes
    those channels (``name`` itself, or the conv a BatchNorm gate follows).
    With ``span > 1`` group channel ``i`` is the output channels ``(offset + i)
    * span`` .. ``(offset + i + 1) * span - 1`` (a grouped conv loses whole
    groups); its score is the sum of theirs."""

    name: str
    offset: int
    channel_dim: int
    producer: str = ""
    span: int = 1
    # observe the module's (first) input instead of its output: an attention head is
    # scored where its output enters the output projection, not at q/k/v
    on_input: bool = False

    def positions(self, channel: int) -> range:
        """The output channels (input channels, ``on_input``) of group channel ``channel``."""
        start = (self.offset + channel) * self.span
        return range(start, start + self.span)


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    ``gates`` holds one gate per producer (each "out" and "depthwise" member):
    the BatchNorm's output when a BatchNorm directly and exclusively follows the
    producer, else the producer's own output. ``bn`` lists those BatchNorms.
    ``exact_masking`` is False when zeroing the channels (``zero_channels``) does
    not compute what removing them computes; ``exact_reason`` says why.
    ``masked_norms`` lists LayerNorm/RMSNorm modules normalizing over these
    channels: when they are the only reason, masking is exact once those norms
    take their statistics over the kept channels (what TaylorPruner does).
    ``extents`` holds, per member, the length of the module axis when the
    analysis ran; ``remove_channels`` uses it to reject stale groups.

    ``blocks``: the channels are that many consecutive blocks of equal size, and
    every block must keep as many channels as the others. The query heads of
    grouped-query attention analysed with ``gqa="query"`` are such a group: block
    ``b`` holds the query heads reading key/value head ``b``, and standard GQA
    (query head ``p`` reads KV head ``p // (Hq // Hkv)``) needs the same number of
    query heads per KV head. Which channels of a block go is free.
    ``zeroes_inputs``: masking also zeroes the consumers' input columns (the
    ``"in"`` members), because the masked channels' values are not zero (a masked
    query head still attends to its kept KV head); removal drops those columns, so
    masking them is exact.
    """

    size: int
    members: list[Member]
    gates: list[Gate]
    bn: list[Member]
    prunable: bool
    reason: str | None
    exact_masking: bool
    name: str
    exact_reason: str | None = None
    extents: tuple[int, ...] = field(default=(), repr=False)
    masked_norms: tuple[str, ...] = ()
    # exact once masked_norms skip the masked channels (nothing else makes masking inexact)
    exact_with_masked_norms: bool = False
    blocks: int = 1
    zeroes_inputs: bool = False

    def members_with_role(self, *roles: str) -> list[Member]:
        """The members whose role is one of ``roles``."""
        return [m for m in self.members if m.role in roles]
