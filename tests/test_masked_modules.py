"""MaskedLinear / MaskedConv2d and mask_model: drop-in behaviour, persistence, and
pruned weights that stay exactly zero through hundreds of optimizer steps."""

import copy
import io

import pytest
import torch
from torch import nn

import pyprune_ext as pp
from pyprune_ext.nn import MaskedConv2d, MaskedLinear, mask_model, masked_modules, unmask_model


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc1 = nn.Linear(6 * 8 * 8, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def random_masks(model, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.weight.shape, generator=gen) < density
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_from_dense_shares_parameters_and_zeroes_pruned(device):
    linear = nn.Linear(12, 5).to(device)
    mask = torch.rand(5, 12, device=device) < 0.3
    masked = MaskedLinear.from_dense(linear, mask)
    assert masked.weight is linear.weight and masked.bias is linear.bias
    assert (linear.weight[~mask] == 0).all() and (linear.weight[mask] != 0).all()
    assert masked.density == pytest.approx(mask.float().mean().item())
    assert masked.sparsity == pytest.approx(1 - masked.density)
    assert list(masked.state_dict()) == ["weight", "bias", "mask"]
    x = torch.randn(3, 12, device=device)
    torch.testing.assert_close(masked(x), linear(x))  # weights already zero: same function


def test_bad_masks_are_rejected():
    linear = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"weight's shape \[3, 4\]"):
        MaskedLinear.from_dense(linear, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or 0/1"):
        MaskedLinear.from_dense(linear, torch.full((3, 4), 0.5))
    model = SmallNet()
    with pytest.raises(KeyError, match="no submodule named 'fc9'"):
        mask_model(model, {"fc9": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(TypeError, match="only nn.Linear and nn.Conv2d"):
        mask_model(nn.Sequential(nn.ReLU()), {"0": torch.ones(1, dtype=torch.bool)})


def test_state_dict_round_trip_and_deepcopy(tmp_path):
    model = mask_model(SmallNet(), random_masks(SmallNet(), 0.3))
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = mask_model(SmallNet(), random_masks(SmallNet(), 1.0, seed=5))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(fresh(x), expected)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(clone, buffer)  # whole-module pickling works too
    assert isinstance(clone.fc1, MaskedLinear) and clone.fc1.mask is not model.fc1.mask


def test_to_dense_and_unmask_model_keep_the_function():
    model = SmallNet()
    mask_model(model, random_masks(model, 0.4))
    assert set(masked_modules(model)) == {"conv", "depthwise", "fc1", "fc2"}
    x = torch.randn(3, 1, 8, 8)
    expected = model(x)
    dense_fc1 = model.fc1.to_dense()
    assert type(dense_fc1) is nn.Linear and (dense_fc1.weight[~model.fc1.mask] == 0).all()
    unmask_model(model)
    assert not masked_modules(model)
    assert type(model.conv) is nn.Conv2d and type(model.fc2) is nn.Linear
    torch.testing.assert_close(model(x), expected)


def test_sparse_and_dense_paths_agree():
    linear = nn.Linear(64, 32).double()
    masked = MaskedLinear.from_dense(linear, torch.rand(32, 64) < 0.1)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    masked.sparse_threshold = 1.0  # force the sparse path
    y_sparse = masked(x)
    y_sparse.sum().backward()
    grads_sparse = (x.grad.clone(), masked.weight.grad.clone(), masked.bias.grad.clone())
    x.grad = None
    masked.zero_grad()
    masked.sparse_threshold = 0.0  # force the dense-masked path
    y_dense = masked(x)
    y_dense.sum().backward()
    torch.testing.assert_close(y_sparse, y_dense)
    for a, b in zip(grads_sparse, (x.grad, masked.weight.grad, masked.bias.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("unbatched", [False, True])
def test_sparse_and_dense_conv_paths_agree(unbatched):
    conv = nn.Conv2d(6, 8, 3, padding=1, dilation=2).double()
    masked = MaskedConv2d.from_dense(conv, torch.rand(8, 6, 3, 3) < 0.15)
    x = torch.randn(6, 9, 11, dtype=torch.float64) if unbatched else torch.randn(3, 6, 9, 11, dtype=torch.float64)
    results = []
    for threshold in (1.0, 0.0):  # sparse, then dense-masked
        masked.sparse_threshold = threshold
        masked.zero_grad()
        xg = x.clone().requires_grad_()
        y = masked(xg)
        y.square().sum().backward()
        results.append((y, xg.grad, masked.weight.grad.clone(), masked.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_automatic_conv_path_choice():
    from pyprune_ext.nn import masked as masked_mod
    cut = masked_mod.SPARSE_CONV_DENSITY_THRESHOLD["cpu"]
    exact = lambda density: torch.arange(16 * 8 * 9).reshape(16, 8, 3, 3) < round(density * 16 * 8 * 9)  # noqa: E731
    conv = MaskedConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), exact(cut - 0.05))
    x = torch.randn(2, 8, 10, 10)
    assert conv._use_sparse(x)
    with torch.no_grad():
        assert conv._use_sparse(x)
    conv.set_mask(exact(cut + 0.05))
    assert not conv._use_sparse(x)
    strided = MaskedConv2d.from_dense(nn.Conv2d(8, 16, 3, stride=2), exact(0.05))
    assert strided._use_sparse(x)  # strided too (stride-phase split input)
    strided.sparse_threshold = 0.0
    assert not strided._use_sparse(x)
    half = MaskedConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1).half(), exact(0.05))
    assert not half._use_sparse(x.half())  # float16 on the CPU: no sparse kernel


def test_automatic_path_choice_follows_the_measured_thresholds():
    from pyprune_ext.nn import masked as masked_mod
    x = torch.randn(2, 784)
    exact = lambda density: torch.arange(300 * 784).reshape(300, 784) < round(density * 300 * 784)  # noqa: E731
    layer = MaskedLinear.from_dense(nn.Linear(784, 300), exact(0.35))
    train_cut = masked_mod.SPARSE_DENSITY_THRESHOLD["cpu"]
    infer_cut = masked_mod.SPARSE_DENSITY_THRESHOLD_INFERENCE["cpu"]
    assert train_cut < 0.35 < infer_cut
    assert not layer._use_sparse(x)  # training: forward + backward, dense-masked wins at 35%
    with torch.no_grad():
        assert layer._use_sparse(x)  # forward only: sparse wins at 35%
    layer.set_mask(exact(0.1))
    assert layer._use_sparse(x)
    layer.sparse_threshold = 0.0  # an explicit threshold overrides the measured ones
    assert not layer._use_sparse(x)
    small = MaskedLinear.from_dense(nn.Linear(100, 10), torch.arange(1000).reshape(10, 100) < 100)
    assert small._use_sparse(torch.randn(2, 100))  # no minimum size
    small.set_mask(torch.ones(10, 100, dtype=torch.bool))
    assert not small._use_sparse(torch.randn(2, 100))


def test_path_choice_follows_dtype_changes():
    # the choice is cached per mask / device / dtype / threshold change, so .to() must refresh it
    layer = MaskedLinear.from_dense(nn.Linear(100, 10), torch.arange(1000).reshape(10, 100) < 50)
    x = torch.randn(2, 100)
    assert layer._use_sparse(x)
    layer.half()
    assert not layer._use_sparse(x.half())  # no float16 sparse CPU kernel
    layer.double()
    assert layer._use_sparse(x.double())
    torch.testing.assert_close(layer(x.double()), nn.functional.linear(x.double(), layer.weight, layer.bias))
    layer.sparse_threshold = 0.01
    assert not layer._use_sparse(x.double())


def test_packed_mask_follows_set_mask():
    masked = MaskedLinear(8, 4)
    masked.sparse_threshold = 1.0
    first = masked.packed()
    assert masked.packed() is first  # cached while the mask is unchanged
    masked.set_mask(torch.eye(4, 8, dtype=torch.bool))
    assert masked.packed().nnz == 4
    assert masked.density == pytest.approx(4 / 32)


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),  # what pyprune's loops build
}


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_through_training(optimizer, sparse):
    torch.manual_seed(0)
    model = SmallNet()
    opt = OPTIMIZERS[optimizer](model.parameters())
    x, target = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(5):  # dense training first: momentum / Adam moments become non-zero
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    masks = random_masks(model, 0.2)
    mask_model(model, masks)  # the optimizer was built on the same Parameters
    for m in masked_modules(model).values():
        m.sparse_threshold = 1.0 if sparse else 0.0  # sparse linear and conv, or dense-masked
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        for name, m in masked_modules(model).items():
            assert (m.weight.grad[~masks[name]] == 0).all(), name
        opt.step()
        losses.append(loss.item())
    for name, m in masked_modules(model).items():
        assert (m.weight[~masks[name]] == 0).all(), name
        assert (m.weight[masks[name]] != 0).any(), name
    assert losses[-1] < losses[0]  # and it still trains


@pytest.mark.parametrize("sparse", [False, True])
def test_compile_fullgraph_masked_mlp_and_cnn(sparse):
    model = mask_model(SmallNet(), random_masks(SmallNet(), 0.5))
    for m in masked_modules(model).values():
        m.sparse_threshold = 1.0 if sparse else 0.0
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    # Training under compile: the same gradients as eager, zero where pruned.
    compiled(x).square().sum().backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, msg=name)
    for m in masked_modules(model).values():
        assert (m.weight.grad[~m.mask] == 0).all()
    packed = model.fc2.packed()
    sparse_fn = torch.compile(lambda h: pp.sparse_masked_linear(h, model.fc2.weight, packed, model.fc2.bias),
                              fullgraph=True)
    h = torch.randn(3, 40)
    torch.testing.assert_close(sparse_fn(h), model.fc2(h))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own, from the reference conv
@pytest.mark.parametrize("kernel, dilation, padding", [(3, 1, "same"), (4, 1, "same"), (3, 2, "same"),
                                                       ((2, 3), 1, "same"), (3, 1, "valid")])
def test_string_padding_matches_conv2d(kernel, dilation, padding, sparse):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, padding=padding, dilation=dilation).double()
    mask = torch.rand(conv.weight.shape) < 0.5
    masked = MaskedConv2d.from_dense(copy.deepcopy(conv), mask)
    masked.sparse_threshold = 1.0 if sparse else 0.0
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    for inputs in (x, x[0]):  # batched and unbatched
        xa, xb = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
        want, got = conv(xa), masked(xb)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
        want.square().sum().backward()
        got.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(masked.weight.grad, conv.weight.grad * mask)
    assert masked.to_dense().padding == padding


def test_modules_pickled_before_the_cached_path_choice_still_load():
    layer = MaskedLinear.from_dense(nn.Linear(10, 4), torch.rand(4, 10) < 0.2)
    state = layer.__dict__.copy()
    del state["_sparse_path"]  # what an older version pickled
    restored = MaskedLinear.__new__(MaskedLinear)
    restored.__setstate__(state)
    x = torch.randn(2, 10)
    assert restored._sparse_path == layer._sparse_path
    torch.testing.assert_close(restored(x), layer(x))


def pyprune_ops_called(fn):
    """The pyprune ops fn() dispatches to (below autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "pyprune":
                self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.names


def test_dense_path_uses_the_weight_itself_while_it_is_known_zeroed():
    torch.manual_seed(0)
    layer = MaskedLinear(12, 7, mask=torch.rand(7, 12) < 0.4)
    layer.sparse_threshold = 0.0
    x = torch.randn(5, 12)
    want = x @ (layer.weight * layer.mask).T + layer.bias
    assert pyprune_ops_called(lambda: layer(x)) == ["masked_linear_prezeroed"]
    torch.testing.assert_close(layer(x), want)
    with torch.no_grad():  # a write the module sees (version counter): back to the masking op
        layer.weight.add_(1.0)
    want = x @ (layer.weight * layer.mask).T + layer.bias
    assert "masked_linear_prezeroed" not in pyprune_ops_called(lambda: layer(x))
    torch.testing.assert_close(layer(x), want)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    optimizer.step()  # the keeper zeroes the pruned weights again
    assert pyprune_ops_called(lambda: layer(x)) == ["masked_linear_prezeroed"]
    assert not layer.weight[~layer.mask].any()
    with torch.no_grad():
        layer.mask[0, 0] = not bool(layer.mask[0, 0])  # an in-place mask change is seen too
    assert "masked_linear_prezeroed" not in pyprune_ops_called(lambda: layer(x))
    layer.set_mask(layer.mask)
    assert pyprune_ops_called(lambda: layer(x)) == ["masked_linear_prezeroed"]
    layer.weight.data.add_(1.0)  # untracked, as autograd documents; apply_mask_ makes it clean again
    layer.apply_mask_()
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).T + layer.bias)


def two_four_mask(out_f, in_f, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(out_f, in_f // 4, 4, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    return keep.view(out_f, in_f).to(device)


def test_semi_structured_path_needs_a_gpu_and_says_why():
    layer = MaskedLinear(64, 32, mask=two_four_mask(32, 64))
    assert layer.semi_structured is None and not layer._semi_structured  # CPU: the dense-masked path
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).T + layer.bias)
    with pytest.raises(ValueError, match=r"semi_structured=True, but the weight is on cpu, not CUDA"):
        layer.semi_structured = True
    with pytest.raises(ValueError, match="must be None, True or False"):
        layer.semi_structured = "yes"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a GPU with 2:4 sparse tensor cores")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_semi_structured_path_matches_the_masked_layer(dtype):
    torch.manual_seed(0)
    layer = MaskedLinear(256, 128, mask=two_four_mask(128, 256)).to("cuda", dtype)
    assert layer._semi_structured, "a 2:4 mask on this GPU takes the semi-structured path"
    x = torch.randn(64, 256, device="cuda", dtype=dtype, requires_grad=True)
    reference = x.detach().double() @ (layer.weight.detach().double() * layer.mask).T + layer.bias.detach().double()
    y = layer(x)
    assert (y.double() - reference).abs().max() <= 2e-2 * reference.abs().max()
    with torch.no_grad():
        assert (layer(x).double() - reference).abs().max() <= 2e-2 * reference.abs().max()
    gy = torch.randn_like(y)
    y.backward(gy)
    wm = layer.weight.detach().double() * layer.mask
    want_gx, want_gw = gy.double() @ wm, (gy.double().T @ x.detach().double()) * layer.mask
    assert (x.grad.double() - want_gx).abs().max() <= 2e-2 * want_gx.abs().max()
    assert (layer.weight.grad.double() - want_gw).abs().max() <= 2e-2 * want_gw.abs().max()
    assert not layer.weight.grad[~layer.mask].any()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    optimizer.step()  # new weights: compressed again, still 2:4
    y2 = layer(x.detach())
    want = x.detach().double() @ (layer.weight.detach().double() * layer.mask).T + layer.bias.detach().double()
    assert (y2.double() - want).abs().max() <= 2e-2 * want.abs().max()
    layer.semi_structured = False
    assert not layer._semi_structured


def test_semi_structured_logic_with_a_stand_in_compression(monkeypatch):
    """The path's own logic on the CPU: PyTorch's compression replaced by a dense
    copy, so choice, caching and gradients are checked without a GPU."""
    from pyprune_ext.nn import semi_structured
    compressed = []

    def stand_in(weight):
        compressed.append(weight._version)
        return weight.detach().clone()

    monkeypatch.setattr(semi_structured, "unsupported_reason", lambda weight, mask: None)
    monkeypatch.setattr(semi_structured, "compress", stand_in)
    torch.manual_seed(0)
    layer = MaskedLinear(64, 32, mask=two_four_mask(32, 64))
    assert layer._semi_structured and len(compressed) == 1
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    assert len(compressed) == 1  # unchanged weight: the compressed one is reused
    wm = layer.weight.detach() * layer.mask
    torch.testing.assert_close(y, x @ wm.T + layer.bias)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ wm)
    torch.testing.assert_close(layer.weight.grad, (gy.T @ x.detach()) * layer.mask)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).T + layer.bias)
    assert len(compressed) == 2  # compressed again after the step
    with torch.no_grad():
        layer.weight[~layer.mask] = 3.0  # not zeroed any more: the masked weight is compressed
        torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).T + layer.bias)
    layer.semi_structured = False
    assert not layer._semi_structured
