"""Taylor importance estimators: per-channel scores of the channel groups found
by :mod:`pyprune_ext.graph`, accumulated over minibatches.

Notation (REFERENCE.md section 1; Molchanov et al., CVPR 2019). A gate
``z_c = 1`` multiplies channel ``c`` of a layer's output ``a``; with the
minibatch's mean loss ``L``, ``g = dL/da`` and
``s[n, c] = sum over h, w of g[n, c, h, w] * a[n, c, h, w]``:

* the gate gradient is ``dL/dz_c = sum_n s[n, c]`` (``first`` of
  ``taylor_channel_stats``), and
* ``sum_n s[n, c] ** 2`` is its per-example second moment (``second``).

Estimators (one score per channel and minibatch, averaged over the minibatches
since the last pruning step):

``fo_bn`` (default)
    ``(gamma * dL/dgamma + beta * dL/dbeta) ** 2`` of the BatchNorm directly
    after a producer: exactly ``(dL/dz_c) ** 2`` for a gate after BN, read from
    the parameter gradients, so no activation is touched. Groups without such a
    BatchNorm (e.g. Linear layers) use the ``fo_gate`` score instead.
``fo_gate``
    ``(sum_n s[n, c]) ** 2`` from the gate points' outputs and gradients (hooks
    feeding ``taylor_channel_stats_``); any layer, (N, C, ...) or (N, L, C).
``fo_fg``
    ``sum_n s[n, c] ** 2``: the per-example ("full gradient") variant.
``fo_weight``
    ``(sum of w * dL/dw over the channel's filter and bias) ** 2``; with
    ``square_then_sum=True``, ``sum of (w * dL/dw) ** 2``.
``so_fisher``
    Second order: ``(-dL/dz_c + H_cc / 2) ** 2``, the change of the loss when
    ``z_c`` goes from 1 to 0 (``dz = -1``: ``dL = -g + H / 2``), with ``H`` the
    empirical-Fisher estimate of the Hessian diagonal. For a mean loss
    ``L = (1/B) sum_n l_n`` the per-example gradient is
    ``dl_n/dz_c = B * s[n, c]``, and the Fisher diagonal of ``L`` is
    ``(1/B) sum_n (dl_n/dz_c) ** 2 = B * sum_n s[n, c] ** 2``. So
    ``H_cc = B * second``, ``B`` the minibatch size (dim 0 of the gate's output).

A group's score is the sum of its members' scores (a residual stream's channel
is removed from every layer that writes it). A unit of channels that goes as a
whole (an attention head, a grouped conv's group) has one gate: its statistics
sum over the unit's channels before squaring, in the same pass (the channel dim
viewed as (units, span)). An attention head's gate is its output where it enters
the output projection (``Gate.on_input``). Channels already pruned score 0.

Distributed (DDP): the per-minibatch statistics are summed over the ranks
before they are squared, in one all-reduce per minibatch, so every rank gets
the score the whole global minibatch gives. Gate statistics are sums over
examples of a mean loss's gradient: rank r sends ``n_r * first_r`` and
``n_r**2 * second_r`` with its example count ``n_r``, and the totals are
divided by ``N = sum n_r`` (``N**2``), exactly what one process computes on the
concatenated minibatch. Parameter gradients are averaged over the ranks, as DDP
averages them (for ``fo_weight`` that all-reduces the filters' gradients: use
``fo_bn`` or a gate criterion to keep the extra traffic at one value per channel).

Memory: a gate hook keeps a reference to the layer's output only until the
backward pass reaches that output (autograd usually holds it anyway); nothing
is stored when the forward runs without gradients.

These five are the built-in criteria of the importance registry
(:mod:`pyprune_ext.taylor.importance`), where criteria of your own are added.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..graph.specs import spec_for
from ..graph.surgery import member_positions
from ..ops import taylor_channel_stats, taylor_weight_stats

CRITERIA = ("fo_bn", "fo_gate", "fo_fg", "fo_weight", "so_fisher")
# the members whose filters fo_weight scores: layers computing the channels (a conv's or a
# Linear's rows, an attention layer's q/k/v rows of a head)
WEIGHT_ROLES = ("out", "heads")


class GroupScores:
    """Sums of per-minibatch scores of every group, and the minibatch count.
    (In a distributed run the per-minibatch statistics are all-reduced before
    scoring, so these sums are already the same on every rank.)"""

    def __init__(self, sizes: Sequence[int], device: torch.device):
        self.sums = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
        self.minibatches = 0

    def add(self, index: int, score: Tensor) -> None:
        self.sums[index] += score.to(self.sums[index].dtype)

    def means(self) -> list[Tensor]:
        count = max(self.minibatches, 1)
        return [s / count for s in self.sums]

    def reset(self) -> None:
        for s in self.sums:
            s.zero_()
        self.minibatches = 0


class Estimator:
    """Base class: ``attach`` installs hooks, ``end_minibatch`` adds what the
    last backward pass left to ``scores`` (one score per channel of each group
    in ``only``), ``detach`` removes everything."""

    def __init__(self, model: nn.Module, groups: Sequence, scores: GroupScores, only: Sequence[int],
                 sync=None):
        self.model = model
        self.groups = list(groups)
        self.scores = scores
        self.indices = list(only)
        self.sync = sync  # a distributed.Sync, or None: no synchronisation
        self._handles: list = []

    @property
    def synchronised(self) -> bool:
        return self.sync is not None and self.sync.active

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def end_minibatch(self) -> bool:
        """Folds the last backward pass into the scores; False when there was none."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Gate estimators: fo_gate, fo_fg, so_fisher.


def _recompute_output(module: nn.Module, inputs: tuple) -> Tensor:
    """The module's output again, from its inputs, without touching its state
    (its layer spec knows how: a BatchNorm in training mode normalises with the
    batch statistics and must not update its running ones)."""
    return spec_for(module).recompute(module, inputs)


class _GatePoint:
    """Accumulates taylor_channel_stats of one module's output over a backward pass."""

    def __init__(self, module: nn.Module, name: str, channel_dim: int, channels: int, device,
                 on_input: bool = False, span: int = 1):
        self.module, self.name, self.channel_dim, self.on_input = module, name, channel_dim, on_input
        if channels % span:
            raise ValueError(f"Taylor gate at {name!r}: {channels} channels are not whole units of {span}")
        self.span = span
        dtype = torch.float64  # (units,) sums: cheap, and exact enough for any input dtype
        self.first = torch.zeros(channels // span, dtype=dtype, device=device)
        self.second = torch.zeros(channels // span, dtype=dtype, device=device)
        self.batch = 0  # examples seen in this minibatch (for so_fisher's B)
        self.seen = False

    def forward_hook(self, module, inputs, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        # Detached aliases (same storage and version counter): the hook must not
        # reference `output` itself, or output -> grad_fn -> hook -> output would
        # be a cycle the garbage collector cannot break when no backward comes.
        held = [output.detach()]
        held_inputs = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
        version = output._version
        input_versions = [t._version if isinstance(t, Tensor) else None for t in held_inputs]

        def on_grad(grad: Tensor) -> None:
            if not held:  # a second backward through a retained graph: counted once
                return
            activation = held.pop()
            if activation._version != version:
                # Modified in place after the forward (torchvision's `out += identity`,
                # an inplace activation): the gradient is w.r.t. the values before
                # that, so recompute them from the module's (unmodified) inputs.
                if any(isinstance(t, Tensor) and t._version != v for t, v in zip(held_inputs, input_versions)):
                    raise RuntimeError(
                        f"Taylor gate at {self.name!r}: its output and its inputs were modified in place "
                        "after the forward pass, so the activation cannot be recovered; use inplace=False "
                        "there or the fo_bn / fo_weight criterion")
                with torch.no_grad():
                    activation = _recompute_output(module, tuple(held_inputs))
            held_inputs.clear()
            self._accumulate(activation, grad)

        output.register_hook(on_grad)

    def pre_hook(self, module, inputs) -> None:
        """An input gate: the module's first input and its gradient (nothing modifies
        a layer's input in place after the layer has read it)."""
        x = inputs[0] if inputs else None
        if not (torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad):
            return
        held = [x.detach()]

        def on_grad(grad: Tensor) -> None:
            if held:
                self._accumulate(held.pop(), grad)

        x.register_hook(on_grad)

    def _accumulate(self, activation: Tensor, grad: Tensor) -> None:
        dim = self.channel_dim % activation.dim()
        if self.span > 1:  # one gate per unit (a head, a conv group): its channel dim split into (units, span)
            shape = activation.shape[:dim] + (-1, self.span) + activation.shape[dim + 1:]
            activation, grad = activation.reshape(shape), grad.reshape(shape)
        first, second = taylor_channel_stats(activation, grad, dim)
        self.first += first.to(self.first.dtype)
        self.second += second.to(self.second.dtype)
        self.batch += activation.shape[0]
        self.seen = True

    def take(self) -> tuple[Tensor, Tensor, int]:
        """This minibatch's sums, and resets them."""
        out = (self.first.clone(), self.second.clone(), self.batch)
        self.first.zero_()
        self.second.zero_()
        self.batch, self.seen = 0, False
        return out


def _gate_score(criterion: str) -> Callable[[Tensor, Tensor, int], Tensor]:
    if criterion == "fo_gate":
        return lambda first, second, batch: first.double() ** 2
    if criterion == "fo_fg":
        return lambda first, second, batch: second.double()
    if criterion == "so_fisher":
        return lambda first, second, batch: (-first.double() + 0.5 * batch * second.double()) ** 2
    raise ValueError(criterion)


class GateEstimator(Estimator):
    """fo_gate / fo_fg / so_fisher: hooks at every group's gate points."""

    def __init__(self, model, groups, scores, only, criterion: str = "fo_gate", sync=None):
        super().__init__(model, groups, scores, only, sync)
        self.score = _gate_score(criterion)
        device = scores.sums[0].device if scores.sums else torch.device("cpu")
        self.points: dict[str, _GatePoint] = {}
        modules = dict(model.named_modules())
        for i in self.indices:
            for gate in self.groups[i].gates:
                if _point_key(gate) not in self.points:
                    module = modules[gate.name]
                    channels = _input_channels(module) if gate.on_input else _output_channels(module)
                    self.points[_point_key(gate)] = _GatePoint(module, gate.name, gate.channel_dim, channels, device,
                                                               on_input=gate.on_input, span=gate.span)

    def attach(self) -> None:
        for point in self.points.values():
            if point.on_input:
                self._handles.append(point.module.register_forward_pre_hook(point.pre_hook))
            else:
                self._handles.append(point.module.register_forward_hook(point.forward_hook))

    def _take_all(self) -> dict[str, tuple[Tensor, Tensor, int]] | None:
        """Every gate point's minibatch sums (over all ranks when synchronised)."""
        if not self.synchronised:
            if not any(p.seen for p in self.points.values()):
                return None
            return {name: p.take() for name, p in self.points.items()}
        taken = {name: p.take() for name, p in self.points.items()}
        device = self.scores.sums[0].device
        packed = []
        for first, second, batch in taken.values():
            packed += [first * batch, second * batch ** 2, torch.tensor([float(batch)], device=device)]
        distributed.all_reduce_sum_(packed, self.sync.group)
        out = {}
        for k, name in enumerate(taken):
            first, second, batch = packed[3 * k], packed[3 * k + 1], int(packed[3 * k + 2].item())
            out[name] = (first / max(batch, 1), second / max(batch, 1) ** 2, batch)
        return out if any(batch for _, _, batch in out.values()) else None

    def end_minibatch(self) -> bool:
        taken = self._take_all()
        if taken is None:
            return False
        for i in self.indices:
            group = self.groups[i]
            total = torch.zeros(group.size, dtype=torch.float64, device=self.scores.sums[i].device)
            for gate in group.gates:
                first, second, batch = taken[_point_key(gate)]  # per unit of gate.span channels
                total += self.score(first, second, batch)[gate.offset:gate.offset + group.size]
            self.scores.add(i, total)
        return True


def _point_key(gate) -> tuple[str, bool, int]:
    return gate.name, gate.on_input, gate.span


def _input_channels(module: nn.Module) -> int:
    axis = spec_for(module).axes(module).get("in")
    if axis is None:
        raise TypeError(f"{type(module).__name__} has no input-channel axis for an input gate")
    return axis.length


def _output_channels(module: nn.Module) -> int:
    spec = spec_for(module)
    if spec is None:
        raise TypeError(f"cannot tell how many output channels {type(module).__name__} has (no layer spec)")
    return spec.output_channels(module)


# ---------------------------------------------------------------------------
# Parameter-gradient estimators: fo_bn and fo_weight.


class _GradCapture:
    """The gradient each backward pass gives a parameter (independent of
    whether the user zeroes .grad between steps)."""

    def __init__(self, param: Tensor):
        self.param = param
        self.grad: Tensor | None = None
        self.handle = param.register_hook(self._store)

    def _store(self, grad: Tensor) -> None:
        self.grad = grad.detach().clone() if self.grad is None else self.grad + grad.detach()

    def take(self) -> Tensor | None:
        grad, self.grad = self.grad, None
        return grad


class ParamEstimator(Estimator):
    """fo_bn (BatchNorm gamma/beta gradients) or fo_weight (filter gradients)."""

    def __init__(self, model, groups, scores, only, criterion: str = "fo_bn", square_then_sum: bool = False,
                 sync=None):
        super().__init__(model, groups, scores, only, sync)
        self.criterion, self.square_then_sum = criterion, square_then_sum
        self.modules = dict(model.named_modules())
        self.captures: dict[int, _GradCapture] = {}

    def _members(self, group):
        return group.bn if self.criterion == "fo_bn" else [m for m in group.members if m.role in WEIGHT_ROLES]

    def attach(self) -> None:
        for i in self.indices:
            for member in self._members(self.groups[i]):
                module = self.modules[member.name]
                for param, _ in _axis_parameters(module, member.role):
                    if param.requires_grad and id(param) not in self.captures:
                        self.captures[id(param)] = _GradCapture(param)
        self._handles.extend(c.handle for c in self.captures.values())

    def detach(self) -> None:
        super().detach()
        self.captures.clear()

    def _take_all(self) -> dict[int, Tensor] | None:
        """This backward pass's gradients (averaged over the ranks when synchronised)."""
        grads = {key: c.take() for key, c in self.captures.items()}
        if not self.synchronised:
            return None if all(g is None for g in grads.values()) else grads
        if not grads:
            return None
        full = [g if g is not None else torch.zeros_like(self.captures[key].param.detach())
                for key, g in grads.items()]
        contributed = torch.tensor([float(any(g is not None for g in grads.values()))], device=full[0].device)
        distributed.all_reduce_sum_([contributed] + full, self.sync.group)
        ranks = int(contributed.item())  # ranks that ran a backward pass (normally all)
        return {key: g / ranks for key, g in zip(grads, full)} if ranks else None

    def end_minibatch(self) -> bool:
        grads = self._take_all()
        if grads is None:
            return False
        for i in self.indices:
            group = self.groups[i]
            total = torch.zeros(group.size, dtype=torch.float64, device=self.scores.sums[i].device)
            for member in self._members(group):
                total += self._member_score(member, group.size, grads)
            self.scores.add(i, total)
        return True

    def _member_score(self, member, size: int, grads: dict) -> Tensor:
        module = self.modules[member.name]
        positions = member_positions(member, torch.arange(size))
        first, second = None, None
        for name, param, dim, index in spec_for(module).entries(module, member.role, positions):
            grad = grads.get(id(param)) if module._parameters.get(name) is param else None
            if grad is None:
                continue
            # the member's channels first (a ConvTranspose holds its output channels on dim 1), each
            # block of a packed tensor (q, k and v rows) in turn
            index = index.to(param.device)
            w = param.detach().index_select(dim, index).movedim(dim, 0)
            g = grad.index_select(dim, index).movedim(dim, 0)
            if w.dim() == 1:  # bias, or a BatchNorm's gamma / beta: one value per channel
                f = (w * g).double()
                s = f ** 2
            else:
                f, s = (t.double() for t in taylor_weight_stats(w.contiguous(), g.contiguous()))
            f, s = f.reshape(-1, len(positions)).sum(0), s.reshape(-1, len(positions)).sum(0)
            first, second = (f, s) if first is None else (first + f, second + s)
        if first is None:
            first = second = torch.zeros(len(positions), dtype=torch.float64, device=self.scores.sums[0].device)
        first = first.reshape(size, member.span).sum(1)  # a unit of span positions scores as one
        second = second.reshape(size, member.span).sum(1)
        return second if self.square_then_sum else first ** 2


def _axis_parameters(module: nn.Module, role: str) -> list[tuple[Tensor, int]]:
    """(parameter, dim) of every parameter that axis ``role`` of the module's spec indexes."""
    axis = spec_for(module).axes(module)[role]
    return [(module._parameters[name], dim) for name, dim in axis.tensors.items()
            if module._parameters.get(name) is not None]


class TaylorImportance:
    """Scores every channel group with one criterion: the estimators it needs,
    their hooks, and the per-group sums of per-minibatch scores.

    Call :meth:`end_minibatch` after each backward pass; :meth:`means` gives the
    mean score per channel over the minibatches since :meth:`reset`."""

    def __init__(self, model: nn.Module, groups: Sequence, criterion: str = "fo_bn",
                 square_then_sum: bool = False, device: torch.device | str | None = None, sync=None):
        if criterion not in CRITERIA:
            raise ValueError(f"unknown Taylor criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.criterion = criterion
        self.groups = list(groups)
        self._attached = False
        self.scores = GroupScores([g.size for g in self.groups], torch.device(device))
        everything = range(len(self.groups))
        if criterion == "fo_bn":
            modules = dict(model.named_modules())
            affine = lambda g: g.bn and all(modules[m.name].weight is not None for m in g.bn)  # noqa: E731
            with_bn = [i for i in everything if affine(self.groups[i])]
            without = [i for i in everything if not affine(self.groups[i])]
            self.parts: list[Estimator] = [ParamEstimator(model, groups, self.scores, with_bn, "fo_bn",
                                                          sync=sync)]
            if without:  # no BatchNorm after the producer: the gate score is the same quantity
                self.parts.append(GateEstimator(model, groups, self.scores, without, "fo_gate", sync))
        elif criterion == "fo_weight":
            self.parts = [ParamEstimator(model, groups, self.scores, everything, "fo_weight", square_then_sum,
                                         sync)]
        else:
            self.parts = [GateEstimator(model, groups, self.scores, everything, criterion, sync)]

    def attach(self) -> "TaylorImportance":
        """Installs the hooks; a second call does nothing (hooks installed twice
        would count every minibatch twice)."""
        if not self._attached:
            for part in self.parts:
                part.attach()
            self._attached = True
        return self

    def detach(self) -> None:
        for part in self.parts:
            part.detach()
        self._attached = False

    def end_minibatch(self) -> bool:
        """Adds the last backward pass's scores; False when no backward pass
        reached the hooks since the previous call (nothing is counted then)."""
        seen = [part.end_minibatch() for part in self.parts]
        if any(seen):
            self.scores.minibatches += 1
        return any(seen)

    def means(self) -> list[Tensor]:
        return self.scores.means()

    def reset(self) -> None:
        self.scores.reset()
