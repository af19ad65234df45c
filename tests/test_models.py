"""pyprune_ext.models: shapes, gradients, parameter counts, initialisation, registry,
one short real training run, and the character GPT."""

import math

import pytest
import torch
from torch import nn

from pyprune_ext import models
from pyprune_ext.models import MODELS, build_model

SHAPES = [(1, 28, 28), (1, 8, 8), (3, 32, 32)]


def n_weights(model: nn.Module) -> int:
    """Conv and Linear weights (no biases, no norms): the count the lottery-ticket paper gives."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_forward_and_backward(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_lenet300_matches_the_paper():
    model = models.lenet300()
    assert n_weights(model) == 784 * 300 + 300 * 100 + 100 * 10  # "266K"
    assert n_params(model) == n_weights(model) + 300 + 100 + 10
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert [n for n, m in model.named_children() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "fc3"]


@pytest.mark.parametrize("factory,paper", [(models.conv2, 4.3e6), (models.conv4, 2.4e6)])
def test_conv_nets_match_the_paper_on_cifar_shapes(factory, paper):
    assert n_weights(factory((3, 32, 32))) == pytest.approx(paper, rel=0.02)


def test_conv6_weights_follow_its_layer_list():
    # The paper prints 1.7M; its layer list gives this (see models' docstring).
    convs = 9 * (3 * 64 + 64 * 64 + 64 * 128 + 128 * 128 + 128 * 256 + 256 * 256)
    fcs = 4 * 4 * 256 * 256 + 256 * 256 + 256 * 10
    assert n_weights(models.conv6((3, 32, 32))) == convs + fcs


@pytest.mark.parametrize("factory,pools", [(models.conv2, 1), (models.conv4, 2), (models.conv6, 3)])
def test_conv_net_flatten_size_follows_input(factory, pools):
    for h, w in [(28, 28), (8, 8), (9, 13)]:
        model = factory((1, h, w), 10)
        first_fc = model.classifier[0]
        channels = model.features[-3].out_channels
        assert first_fc.in_features == channels * (h >> pools) * (w >> pools)
        assert model(torch.randn(1, 1, h, w)).shape == (1, 10)


@pytest.mark.parametrize("factory,need", [(models.conv2, 2), (models.conv6, 8),
                                          (models.vgg11_bn_small, 8)])
def test_too_small_inputs_raise_clearly(factory, need):
    with pytest.raises(ValueError, match=f"at least {need}x{need}; got {need - 1}x{need}"):
        factory((1, need - 1, need))


def test_resnet20_structure_and_size():
    model = models.resnet20()
    assert 0.26e6 < n_params(model) < 0.28e6  # the paper's "0.27M"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(convs) - len(shortcuts) == 19  # 19 3x3 convs + fc = 20 weighted layers
    assert [(m.in_channels, m.out_channels, m.stride) for m in shortcuts] == [(16, 32, (2, 2)),
                                                                             (32, 64, (2, 2))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19 + 2
    assert model.fc.in_features == 64


def test_resnet20_residual_is_used():
    block = models.BasicBlock(8, 8)
    x = torch.randn(2, 8, 5, 5)
    # With the residual branch's last BN zeroed, the block is relu(x).
    nn.init.zeros_(block.bn2.weight)
    nn.init.zeros_(block.bn2.bias)
    block.eval()
    torch.testing.assert_close(block(x), torch.relu(x))


def test_resnet20_grayscale():
    model = models.resnet20(num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_glorot_initialisation():
    torch.manual_seed(0)
    model = models.lenet300()
    w = model.fc1.weight
    expected = math.sqrt(2.0 / (784 + 300))
    assert w.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(w.mean().item()) < 0.1 * expected
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Linear))
    conv = models.conv2((1, 28, 28)).features[2]
    fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.03)


def test_mlp_sizes_and_errors():
    model = models.mlp(64, (32, 16, 8), num_classes=4)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 8), (8, 4)]
    assert models.mlp(64, (), 4)(torch.randn(5, 64)).shape == (5, 4)
    with pytest.raises(ValueError, match="positive"):
        models.mlp(64, (0,), 4)


def test_transformer_mlp_block():
    torch.manual_seed(0)
    block = models.TransformerMLPBlock(dim=16, hidden=64)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    reference = x + block.fc2(nn.functional.gelu(block.fc1(nn.functional.layer_norm(
        x, (16,), block.norm.weight, block.norm.bias))))
    torch.testing.assert_close(y, reference)
    y.sum().backward()
    assert x.grad is not None and block.fc1.weight.grad is not None
    with pytest.raises(ValueError, match="last dimension of 16"):
        block(torch.randn(2, 5, 8))


def test_build_model_adapts_to_digits():
    assert build_model("lenet300", (1, 8, 8)).fc1.in_features == 64
    assert build_model("resnet20", (3, 8, 8)).conv1.in_channels == 3


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'lenet5'.*lenet300"):
        build_model("lenet5", (1, 28, 28))
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        build_model("lenet300", (28, 28))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet300", (1, 28, 28), num_classes=0)


def test_resnet18_from_torchvision():
    pytest.importorskip("torchvision")
    assert "resnet18" in MODELS
    imagenet = models.resnet18()
    assert n_params(imagenet) == pytest.approx(11.69e6, rel=1e-3)
    small = build_model("resnet18", (1, 28, 28), 10)
    assert small.conv1.in_channels == 1 and small.conv1.kernel_size == (3, 3)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    big = build_model("resnet18", (3, 96, 96), 10)
    assert big.conv1.kernel_size == (7, 7) and big.fc.out_features == 10


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")
    from pyprune_ext.data import load_dataset
    return load_dataset("digits")


def accuracy(model, dataset) -> float:
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_lenet300_learns_digits(digits):
    from pyprune_ext.data import make_loaders
    torch.manual_seed(0)
    model = build_model("lenet300", digits.input_shape, digits.num_classes)
    before = accuracy(model, digits.test)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)  # the paper's LeNet setting
    loaders = make_loaders(digits, batch_size=60, seed=0)
    for _ in range(8):
        model.train()
        for x, y in loaders.train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    after = accuracy(model, digits.test)
    assert before < 0.3
    assert after > 0.9, f"test accuracy {after:.3f} after 8 epochs"


# ----------------------------------------------------------------------- character GPT

def tiny_gpt(vocab=11, context=16, **sizes):
    sizes = {"dim": 32, "depth": 2, "heads": 4, "hidden": 64, **sizes}
    return models.CharGPT(vocab, context, **sizes)


def test_char_gpt_output_shape_and_sizes():
    torch.manual_seed(0)
    model = models.char_gpt(11, context=16)
    assert isinstance(model, models.CharGPT) and "char_gpt" not in MODELS
    assert model(torch.randint(0, 11, (3, 16))).shape == (3, 16, 11)
    assert model(torch.randint(0, 11, (2, 5))).shape == (2, 5, 11)  # shorter than the context
    assert model(torch.randint(0, 11, (2, 5), dtype=torch.int32)).shape == (2, 5, 11)
    assert model.tok.weight.shape == (11, 128) and model.pos.weight.shape == (16, 128)
    assert model.lm_head.bias is None and model.lm_head.weight.data_ptr() != model.tok.weight.data_ptr()
    block = model.blocks[0]
    assert [type(m) for m in block.mlp] == [nn.Linear, nn.GELU, nn.Linear] and block.mlp[0].out_features == 512
    assert [getattr(block.attn, n).weight.shape for n in ("q", "k", "v", "out")] == [(128, 128)] * 4
    assert len(model.blocks) == 4 and block.attn.num_heads == 4 and block.attn.head_dim == 32


def test_char_gpt_is_causal():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    idx = torch.randint(0, 11, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 11
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4  # the changed token and those after it see it


def test_char_gpt_attention_matches_a_reference():
    torch.manual_seed(0)
    attn = models.CausalSelfAttention(16, 4)
    x = torch.randn(2, 5, 16)
    heads = [t.view(2, 5, 4, 4).transpose(1, 2) for t in (attn.q(x), attn.k(x), attn.v(x))]
    scores = heads[0] @ heads[1].transpose(-2, -1) / 2.0  # sqrt(head_dim)
    scores = scores.masked_fill(~torch.tril(torch.ones(5, 5, dtype=torch.bool)), float("-inf"))
    reference = attn.out((scores.softmax(-1) @ heads[2]).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), reference)


def test_char_gpt_refuses_bad_input():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="integer token ids, got a torch.float32"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer token ids, got a torch.bool"):
        model(torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer token ids, got list"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="sequence length 17 exceeds the context of 16"):
        model(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, length\).*got shape \(4,\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of heads"):
        models.CharGPT(11, dim=30, heads=4)
    with pytest.raises(ValueError, match="vocab_size=0"):
        models.CharGPT(0)
    with pytest.raises(ValueError, match="positive multiple of heads"):
        models.CausalSelfAttention(10, 3)


def test_char_gpt_num_heads_follows_pruning():
    """The head count is read from the layers, so removing a head (the graph analysis
    finds q/k/v rows and out columns in units of head_dim) leaves a working model."""
    import warnings
    from pyprune_ext.graph import GraphAnalysisWarning, dependency_groups, remove_channels
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    idx = torch.randint(0, 11, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphAnalysisWarning)  # torch.fx traces it, no fallback
        groups = dependency_groups(model, idx)
    heads = [i for i, g in enumerate(groups) if any(m.name == "blocks.0.attn.q" and m.role == "out"
                                                     for m in g.members)]
    (i,) = heads
    assert groups[i].prunable and groups[i].size == 4
    assert {m.name.rsplit(".", 1)[1]: m.span for m in groups[i].members} == {"q": 8, "k": 8, "v": 8, "out": 8}
    remove_channels(model, groups, {i: torch.tensor([0, 2, 3])})
    attn = model.blocks[0].attn
    assert attn.q.out_features == attn.k.out_features == attn.v.out_features == attn.out.in_features == 24
    assert attn.num_heads == 3 and attn.head_dim == 8 and model.blocks[1].attn.num_heads == 4
    assert model(idx).shape == (2, 16, 11)


def test_char_gpt_taylor_prunes_heads_neurons_and_width_and_removal_equals_masking():
    """TaylorPruner ranks heads, MLP neurons and the residual width (both embeddings,
    every norm and projection on the stream) per MAC; the finalized model computes
    what the masked one did, and its counts drop as reported."""
    from pruning_loop import finalize_and_compare, train_until_done
    from pyprune_ext.cost import count_cost
    from pyprune_ext.taylor import Target, TaylorPruner
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, 11, (4, 16))
    share = {"attn": 0.25, "mlp": 0.3, "residual": 0.25}
    pruner = TaylorPruner(model, idx[:2], "fo_gate", target=Target.flops(0.6), every=1, prune_per_step=6,
                          normalize="macs", max_fraction=lambda g: next(v for k, v in share.items() if k in g.name))

    def loss_of(m):
        logits = m(idx[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 11), idx[:, 1:].reshape(-1))

    train_until_done(pruner, model, loss_of)
    small, diff = finalize_and_compare(pruner, model, lambda m: m(idx))
    assert diff <= 1e-4
    assert small.tok.embedding_dim == small.pos.embedding_dim == small.norm.normalized_shape[0] < 32
    assert any(b.attn.num_heads < 4 for b in small.blocks) and any(b.mlp[0].out_features < 64 for b in small.blocks)
    after = count_cost(small, (idx[:2],))
    report = pruner.report()
    assert report.macs_after == after.total_macs <= 0.6 * report.macs_before
    assert report.params_after == after.total_params


def test_char_gpt_learns_a_repeated_string():
    torch.manual_seed(0)
    text = "hello, pruned world! " * 8
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    x, y = ids[:-1].unfold(0, 16, 16), ids[1:].unfold(0, 16, 16)
    model = tiny_gpt(vocab=len(chars), depth=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(len(chars)), abs=0.3)  # an untrained model guesses uniformly
    assert losses[-1] < 0.5 * losses[0], losses[::8]
