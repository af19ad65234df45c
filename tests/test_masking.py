"""ZeroKeeper: held entries stay exactly zero through every torch.optim optimizer,
keepers and what they hold are garbage collected with their owners, optimizers
do not interfere, attach/remove/with lifetimes, and bad input named.

SparseAdam is not covered: it accepts only sparse gradients (nn.Embedding with
sparse=True), and masked layers and parameter masks have dense ones."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pyprune_ext
from pyprune_ext.lottery._param_masks import param_mask, set_param_mask
from pyprune_ext.masking import ZeroKeeper
from pyprune_ext.nn import MaskedLinear, mask_model, masked_modules, unmask_model
from pyprune_ext.taylor import Target, TaylorPruner


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add synchronisation (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(nn.Module):
    """conv -> batch norm -> linear on 1x4x4 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def data(seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def train_steps(model, optimizer, steps, x, y):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_plain_sgd_untouched(model):
    """One plain SGD step with every gradient 1 moves every weight from 1 to 0.5:
    no entry zeroed by someone else's keeper."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.ones_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, torch.full_like(p, 0.5)), name


# ------------------------------------------------------------------- lifetimes


def test_dropped_taylor_pruner_is_collected_and_stops_zeroing():
    torch.manual_seed(0)
    model = Tiny()
    x, y = data()
    pruner = TaylorPruner(model, x[:2], target=Target.channels(2), every=1, prune_per_step=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.step()
        optimizer.step()
    assert pruner.channels_removed == 2
    zeroed = next(p for p in pruner._zeros.params() if p is model.conv.weight)
    rows = pruner._zeros.indices(zeroed, 0)
    assert rows.numel() == 2 and zeroed[rows].abs().sum() == 0
    pruner_ref, keeper_ref = weakref.ref(pruner), weakref.ref(pruner._zeros)
    del pruner, zeroed
    gc.collect()
    assert pruner_ref() is None and keeper_ref() is None
    # Its model is no longer held at zero, and no other model is touched.
    assert_plain_sgd_untouched(model)
    assert_plain_sgd_untouched(Tiny())


def test_dropped_unfinished_taylor_pruner_takes_its_hooks_off_the_model():
    model = Tiny()
    x, y = data()
    pruner = TaylorPruner(model, x[:2], "fo_gate", target=Target.channels(3), every=100)
    F.cross_entropy(model(x), y).backward()
    pruner.step()
    assert not pruner.done and any(m._forward_hooks for m in model.modules())
    pruner_ref = weakref.ref(pruner)
    del pruner
    gc.collect()
    assert pruner_ref() is None and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("end", ["remove", "finalize"])
def test_taylor_pruner_remove_and_finalize_release_its_keeper(end):
    torch.manual_seed(0)
    model = Tiny()
    x, y = data()
    pruner = TaylorPruner(model, x[:2], target=Target.channels(1), every=1, prune_per_step=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pruner.step()
    assert pruner.channels_removed == 1 and len(pruner._zeros) > 0
    getattr(pruner, end)()
    assert not pruner._zeros.active
    if end == "finalize":
        assert len(pruner._zeros) == 0  # its indices belonged to the shapes before removal
    assert_plain_sgd_untouched(model)


def test_dropped_masked_model_is_collected_and_other_models_are_untouched():
    torch.manual_seed(1)
    model = Tiny()
    gen = torch.Generator().manual_seed(1)
    mask_model(model, {"conv": torch.rand(4, 1, 3, 3, generator=gen) < 0.5,
                       "fc": torch.rand(5, 64, generator=gen) < 0.5})
    set_param_mask(model.bn.weight, torch.tensor([True, False, True, False]))
    keeper = ZeroKeeper()
    keeper.add_indices(model.conv.bias, 0, [1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 3, *data())
    refs = ([weakref.ref(model), weakref.ref(optimizer), weakref.ref(keeper)]
            + [weakref.ref(m) for m in masked_modules(model).values()]
            + [weakref.ref(p) for p in model.parameters()])
    bn_weight_ref = weakref.ref(model.bn.weight)
    del model, optimizer, keeper
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert bn_weight_ref() is None
    assert_plain_sgd_untouched(Tiny())  # likely built on the ids the dropped parameters had


def test_unmasked_model_trains_freely_once_its_masked_modules_are_gone():
    model = mask_model(Tiny(), {"fc": torch.rand(5, 64) < 0.5})
    unmask_model(model)
    gc.collect()
    assert_plain_sgd_untouched(model)


def test_two_models_with_two_optimizers_do_not_interfere():
    torch.manual_seed(2)
    models = [Tiny(), Tiny()]
    masks = [{"fc": torch.rand(5, 64) < 0.5}, {"fc": torch.rand(5, 64) < 0.5}]
    for model, mask in zip(models, masks):
        mask_model(model, mask)
        set_param_mask(model.fc.bias, torch.tensor([True, False, True, True, False]))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    x, y = data()
    for step in range(20):
        mine, other = step % 2, 1 - step % 2
        with torch.no_grad():  # someone writes into the other model's pruned entries
            models[other].fc.weight[~masks[other]["fc"]] = 3.0
            models[other].fc.bias[1] = 3.0
        train_steps(models[mine], optimizers[mine], 1, x, y)
        assert (models[mine].fc.weight[~masks[mine]["fc"]] == 0).all()
        assert models[mine].fc.bias[1] == 0 and models[mine].fc.bias[4] == 0
        assert (models[other].fc.weight[~masks[other]["fc"]] == 3.0).all()  # not touched by mine's step
        assert models[other].fc.bias[1] == 3.0


def test_attached_keeper_acts_only_after_its_optimizers_steps():
    p = nn.Parameter(torch.ones(4))
    mine, other = torch.optim.SGD([p], lr=0.0), torch.optim.SGD([p], lr=0.0)
    keeper = ZeroKeeper().attach(mine)
    assert keeper.attach(mine) is keeper  # attaching twice adds no second hook
    keeper.add_indices(p, 0, [1])
    assert p.tolist() == [1, 0, 1, 1]  # registering zeroes at once

    def write_ones_and_step(optimizer):
        with torch.no_grad():
            p.fill_(1.0)
        p.grad = torch.zeros_like(p)
        optimizer.step()
        return p.tolist()

    assert write_ones_and_step(other) == [1, 1, 1, 1]
    assert write_ones_and_step(mine) == [1, 0, 1, 1]
    # The optimizer's hook does not keep the keeper alive; a dropped keeper stops.
    keeper_ref = weakref.ref(keeper)
    del keeper
    gc.collect()
    assert keeper_ref() is None
    assert write_ones_and_step(mine) == [1, 1, 1, 1]


def test_remove_and_the_with_block_stop_the_keeper():
    p = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.0)

    def write_ones_and_step():
        with torch.no_grad():
            p.fill_(1.0)
        p.grad = torch.zeros_like(p)
        optimizer.step()
        return p.tolist()

    with ZeroKeeper() as keeper:
        keeper.add_mask(p, torch.tensor([True, False, True]))
        assert keeper.active and write_ones_and_step() == [1, 0, 1]
    assert not keeper.active and write_ones_and_step() == [1, 1, 1]
    with pytest.raises(RuntimeError, match="attach after remove"):
        keeper.attach(optimizer)
    keeper.zero_now()  # what is held stays usable by hand
    assert p.tolist() == [1, 0, 1]

    attached = ZeroKeeper().attach(optimizer)
    attached.add_mask(p, torch.tensor([False, True, True]))
    attached.remove()
    attached.remove()  # twice is fine
    assert write_ones_and_step() == [1, 1, 1]


# --------------------------------------------------------------- optimizers


def _variants():
    """(id, optimizer class, kwargs): every torch.optim optimizer for dense
    parameters, for-loop and foreach, and fused where torch has a CPU kernel."""
    o = torch.optim
    table = [
        ("sgd_momentum", o.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3), True),
        ("sgd_nesterov", o.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), True),
        ("adam", o.Adam, dict(lr=1e-2, weight_decay=1e-3), True),
        ("adamw", o.AdamW, dict(lr=1e-2, weight_decay=0.1), True),
        ("adamax", o.Adamax, dict(lr=1e-2), False),
        ("nadam", o.NAdam, dict(lr=1e-2), False),
        ("radam", o.RAdam, dict(lr=1e-2), False),
        ("adagrad", o.Adagrad, dict(lr=5e-2), True),
        ("adadelta", o.Adadelta, dict(lr=1.0), False),
        ("rmsprop", o.RMSprop, dict(lr=1e-3, momentum=0.9), False),
        ("asgd", o.ASGD, dict(lr=1e-2), False),
        ("rprop", o.Rprop, dict(lr=1e-2), False),
    ]
    for name, cls, kwargs, has_fused in table:
        yield f"{name}-forloop", cls, {**kwargs, "foreach": False}
        yield f"{name}-foreach", cls, {**kwargs, "foreach": True}
        if has_fused:
            yield f"{name}-fused", cls, {**kwargs, "fused": True}
    yield "lbfgs", o.LBFGS, dict(lr=0.1, max_iter=2)


VARIANTS = {name: (cls, kwargs) for name, cls, kwargs in _variants()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_optimizer_keeps_held_entries_exactly_zero_for_300_steps(variant):
    cls, kwargs = VARIANTS[variant]
    torch.manual_seed(3)
    model = Tiny()
    x, y = data()
    groups = [{"params": [*model.conv.parameters(), *model.bn.parameters()]},
              {"params": list(model.fc.parameters()), "lr": kwargs["lr"] * 0.5}]
    if cls is torch.optim.LBFGS:  # it refuses parameter groups
        groups = list(model.parameters())
    optimizer = cls(groups, **kwargs)

    def step():
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if isinstance(optimizer, torch.optim.LBFGS):
            return optimizer.step(closure)
        loss = closure()
        optimizer.step()
        return loss

    for _ in range(3):  # dense first: the optimizer state is non-zero everywhere
        step()
    gen = torch.Generator().manual_seed(3)
    masks = {"conv": torch.rand(4, 1, 3, 3, generator=gen) < 0.5, "fc": torch.rand(5, 64, generator=gen) < 0.5}
    mask_model(model, masks)
    bn_keep = torch.tensor([True, False, True, True])
    set_param_mask(model.bn.weight, bn_keep)
    channels = ZeroKeeper()  # as TaylorPruner holds a channel
    channels.add_indices(model.conv.bias, 0, [2])
    held = {"conv.weight": (model.conv.weight, ~masks["conv"]), "fc.weight": (model.fc.weight, ~masks["fc"]),
            "bn.weight": (model.bn.weight, ~bn_keep), "conv.bias": (model.conv.bias, torch.arange(4) == 2)}
    before = {name: p[~pruned].clone() for name, (p, pruned) in held.items()}
    for i in range(300):
        step()
        for name, (p, pruned) in held.items():
            assert torch.count_nonzero(p[pruned]) == 0, f"{name} after step {i + 1}"
    for name, (p, pruned) in held.items():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p[~pruned], before[name]), f"{name}: the kept entries did not train"
    # Parameters whose gradients are not masked get their state zeroed after every step.
    if not isinstance(optimizer, torch.optim.LBFGS):  # (its state is one flat vector for all parameters)
        for name in ("bn.weight", "conv.bias"):
            p, pruned = held[name]
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert torch.count_nonzero(value[pruned]) == 0, f"{name} state {key}"


def test_state_created_at_the_first_step_or_loaded_later_is_zeroed():
    torch.manual_seed(4)
    model = Tiny()
    x, y = data()
    # A parameter mask before the optimizer has any state: the moments made by
    # the first step (from an unmasked gradient) are zeroed after it.
    set_param_mask(model.fc.bias, torch.tensor([True, False, True, True, True]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 1, x, y)
    assert optimizer.state[model.fc.bias]["exp_avg"][1] == 0
    # A masked layer (state zeroed once per change): an optimizer state loaded
    # from before pruning is zeroed again after the next step.
    dense_state = copy.deepcopy(optimizer.state_dict())
    keep = torch.rand(5, 64) < 0.5
    mask_model(model, {"fc": keep})
    train_steps(model, optimizer, 2, x, y)
    assert torch.count_nonzero(optimizer.state[model.fc.weight]["exp_avg"][~keep]) == 0
    optimizer.load_state_dict(dense_state)
    assert torch.count_nonzero(optimizer.state[model.fc.weight]["exp_avg"][~keep]) > 0
    train_steps(model, optimizer, 1, x, y)
    assert torch.count_nonzero(optimizer.state[model.fc.weight]["exp_avg"][~keep]) == 0


def test_pruned_inf_and_nan_become_zero():
    p = nn.Parameter(torch.ones(4))
    keeper = ZeroKeeper()
    keeper.add_mask(p, torch.tensor([True, False, True, True]))
    keeper.add_indices(p, 0, [3])
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, float("nan"), 2.0, float("inf")]))
    p.grad = torch.zeros_like(p)
    torch.optim.SGD([p], lr=0.1).step()
    assert p.tolist() == [1.0, 0.0, 2.0, 0.0]


# ------------------------------------------------------- what a keeper holds


def test_masks_and_indices_merge_and_set_mask_replaces():
    keeper = ZeroKeeper()
    weight = nn.Parameter(torch.ones(2, 3))
    keeper.add_mask(weight, torch.tensor([[True, False, True], [True, True, True]]))
    keeper.add_mask(weight, torch.tensor([[1, 1, 1], [0, 1, 1]]))  # 0/1 numbers are accepted
    keeper.add_indices(weight, -1, [2])
    keeper.add_indices(weight, 1, torch.tensor([2, 2]))  # merged with the same dim given as -1
    assert weight.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert keeper.mask_of(weight).tolist() == [[True, False, False], [False, True, False]]
    assert keeper.indices(weight, 1).tolist() == [2] and keeper.indices(weight, 0).tolist() == []
    keeper.set_mask(weight, torch.tensor([[True, True, True], [True, True, False]]))  # indices dropped too
    assert keeper.mask_of(weight).tolist() == [[True, True, True], [True, True, False]]
    assert weight in keeper and len(keeper) == 1 and keeper.params()[0] is weight
    keeper.discard(weight)
    assert weight not in keeper and keeper.mask_of(weight) is None
    with torch.no_grad():
        weight.fill_(1.0)
    keeper.zero_now()
    assert bool((weight == 1).all())


@pytest.mark.parametrize("layer, param, dim, channel", [
    (lambda: nn.ConvTranspose2d(3, 4, 2), "weight", 1, (slice(None), 1)),  # output channels are dim 1
    (lambda: nn.LayerNorm([2, 5]), "weight", -1, (slice(None), 3)),         # a LayerNorm's channels: last dim
    (lambda: nn.Conv1d(2, 6, 3), "weight", 0, (4,)),
])
def test_indices_along_any_dim_through_an_optimizer(layer, param, dim, channel):
    torch.manual_seed(5)
    module = layer()
    weight = getattr(module, param)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    keeper = ZeroKeeper()
    keeper.add_indices(weight, dim, [channel[-1]])
    for _ in range(5):
        optimizer.zero_grad()
        shape = {nn.ConvTranspose2d: (2, 3, 4, 4), nn.LayerNorm: (3, 2, 5), nn.Conv1d: (2, 2, 8)}[type(module)]
        module(torch.randn(shape)).square().sum().backward()
        optimizer.step()
        assert torch.count_nonzero(weight[channel]) == 0
        assert torch.count_nonzero(optimizer.state[weight]["exp_avg"][channel]) == 0
    assert torch.count_nonzero(weight) > 0


def test_lottery_param_mask_reads_back():
    bias = nn.Parameter(torch.ones(3))
    assert param_mask(bias) is None
    set_param_mask(bias, torch.tensor([True, False, True]))
    assert param_mask(bias).tolist() == [True, False, True] and bias.tolist() == [1, 0, 1]


def test_masked_module_moves_with_swap_tensors_on():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        keep = torch.rand(3, 4) < 0.5
        layer = MaskedLinear(4, 3, mask=keep).to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    layer(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert layer.weight.dtype == torch.float64 and torch.count_nonzero(layer.weight[~keep]) == 0


def test_exported_from_the_package():
    assert pyprune_ext.ZeroKeeper is ZeroKeeper and pyprune_ext.masking.ZeroKeeper is ZeroKeeper


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, error, message", [
    (lambda k, p: k.add_mask(p, torch.ones(3, 2, dtype=torch.bool)), ValueError, r"parameter's shape \[2, 3\]"),
    (lambda k, p: k.set_mask(p, torch.full((2, 3), 0.5)), ValueError, "only 0 and 1"),
    (lambda k, p: k.add_mask(p, torch.ones(2, 3, dtype=torch.complex64)), TypeError, "dtype torch.complex64"),
    (lambda k, p: k.add_mask(p, [[True] * 3] * 2), TypeError, "mask must be a bool tensor, got list"),
    (lambda k, p: k.add_indices(p, 0, [0, 2]), IndexError, "index 2 is out of range for dim 0 of size 2"),
    (lambda k, p: k.add_indices(p, 1, [-1]), IndexError, "index -1 is out of range for dim 1 of size 3"),
    (lambda k, p: k.add_indices(p, 2, [0]), IndexError, r"dim 2 is out of range .* shape \[2, 3\]"),
    (lambda k, p: k.add_indices(p, -3, [0]), IndexError, "dim -3 is out of range"),
    (lambda k, p: k.add_indices(p, 0.0, [0]), TypeError, "dim must be an int, got float"),
    (lambda k, p: k.add_indices(p, 0, torch.tensor([True, False])), TypeError, "bool keep-mask goes to add_mask"),
    (lambda k, p: k.add_indices(p, 0, [0.5]), TypeError, "indices must be integers"),
    (lambda k, p: k.add_indices(p, 0, torch.zeros(1, 1, dtype=torch.long)), ValueError, "one-dimensional"),
    (lambda k, p: k.add_indices(p, 0, "0"), TypeError, "got str"),
    (lambda k, p: k.add_indices(nn.Linear(3, 2), 0, [0]), TypeError, "got a Linear module; pass one of its"),
    (lambda k, p: k.add_mask(3.0, torch.ones(())), TypeError, "expected a parameter .* got float"),
    (lambda k, p: k.add_indices(p * 2, 0, [0]), ValueError, "non-leaf"),
    (lambda k, p: k.zero_now("sgd"), TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
    (lambda k, p: k.attach(nn.Linear(1, 1)), TypeError, "expected a torch.optim.Optimizer, got Linear"),
])
def test_bad_input_is_named(call, error, message):
    keeper = ZeroKeeper()
    param = nn.Parameter(torch.ones(2, 3))
    with pytest.raises(error, match=message):
        call(keeper, param)
    assert bool((param == 1).all())  # nothing half-registered


def test_a_parameter_reshaped_under_its_keeper_is_named():
    param = nn.Parameter(torch.ones(4))
    keeper = ZeroKeeper()
    keeper.add_indices(param, 0, [3])
    param.data = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"changed shape from \[4\] to \[2\]"):
        keeper.zero_now()
