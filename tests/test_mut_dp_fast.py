"""common.learning.dp_fast against a per-member reference written here (one backward pass per
member, clipped and summed by hand, noise replayed from the same generator or key): kills the
mutants tests/test_dp_training.py and tests/test_secure_noise.py leave alive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.learning import dp_fast
from common.privacy.secure_noise import SecureRandom

KEY, NONCE = bytes(range(32)), bytes(16)


class _PerMember(nn.Module):
    """Squared error summed per member; ``reduction`` as torch's losses have it."""

    reduction = "mean"

    def forward(self, out, target):
        per = ((out - target) ** 2).sum(dim=1)
        return per if self.reduction == "none" else per.mean()


class _Net(nn.Module):
    """A 2-D layer, a sequence layer in either norm form, a bias-free head and an unused layer."""

    def __init__(self, seq_in=3, seq_out=4, bias=True):
        super().__init__()
        self.seq = nn.Linear(seq_in, seq_out, bias=bias)
        self.flat = nn.Linear(2, seq_out)
        self.head = nn.Linear(seq_out, 2, bias=False)
        self.unused = nn.Linear(2, 2)

    def forward(self, x, z):
        h = torch.tanh(self.seq(x)).mean(dim=tuple(range(1, x.dim() - 1)))
        return self.head(h + self.flat(z))


def _data(b=6, t=2, seq_in=3, extra=()):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, *extra, t, seq_in, generator=g, dtype=torch.float64)
    z = torch.randn(b, 2, generator=g, dtype=torch.float64)
    y = torch.randn(b, 2, generator=g, dtype=torch.float64) * torch.arange(1, b + 1, dtype=torch.float64)[:, None]
    return x, z, y


def _reference(net, x, z, y, clip):
    """Per-member gradients, one backward each; their norms; the clipped sum per parameter."""
    params = [p for p in net.parameters()]
    per, norms = [], []
    for i in range(x.shape[0]):
        net.zero_grad(set_to_none=True)
        ((net(x[i:i + 1], z[i:i + 1]) - y[i:i + 1]) ** 2).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        per.append(grads)
        norms.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    factors = torch.stack([torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
    sums = [sum(factors[i] * per[i][k] for i in range(len(per))) for k in range(len(params))]
    return torch.stack(norms), factors, sums


@pytest.mark.parametrize("t,extra,seq_in,seq_out,bias", [
    (2, (), 3, 4, True),    # 3·4 > 2²: the Gram form
    (4, (), 3, 4, True),    # 3·4 ≤ 4²: per-member gradients materialised
    (3, (2,), 3, 5, False),  # a [B, 2, 3, k] input is one sequence of 6; no bias
])
def test_clipped_sums_and_factors_equal_the_per_member_reference(t, extra, seq_in, seq_out, bias):
    torch.manual_seed(0)
    net = _Net(seq_in, seq_out, bias).double()
    x, z, y = _data(t=t, seq_in=seq_in, extra=extra)
    norms, factors, sums = _reference(net, x, z, y, clip=1.0)
    clip = float(norms.median())  # some members clipped, some not
    _, factors, sums = _reference(net, x, z, y, clip)
    assert (factors < 1).any() and (factors == 1).any()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        per_member = ((net(x, z) - y) ** 2).sum(1)
    tapped, _, criterion = dp_fast.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), _PerMember(),
                                                noise_multiplier=0.0, clip_norm=clip, expected_batch_size=1)
    assert criterion.criterion.reduction == "none"
    loss = criterion(tapped(x, z), y)
    assert torch.allclose(loss.detach(), per_member.mean())
    loss.backward()
    assert torch.allclose(loss.factors, factors, rtol=1e-9, atol=0)
    for p, expected in zip(net.parameters(), sums):
        assert torch.allclose(p.grad, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(net.unused.weight.grad, torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(net.unused.bias.grad, torch.zeros(2, dtype=torch.float64))
    assert tapped.records == {}


@pytest.mark.parametrize("t", [2, 4])
def test_per_member_squared_norms_by_hand(t):
    layer = nn.Linear(3, 4).double()
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, t, 3, generator=g, dtype=torch.float64)
    grad_out = torch.randn(5, t, 4, generator=g, dtype=torch.float64)
    # member i's weight gradient is Σ_t g_t a_tᵀ, its bias gradient Σ_t g_t
    expected = torch.stack([torch.einsum("to,ti->oi", grad_out[i], a[i]).pow(2).sum()
                            + grad_out[i].sum(0).pow(2).sum() for i in range(5)])
    assert torch.allclose(dp_fast.per_member_sq_norms(layer, a, grad_out), expected, rtol=1e-12)
    no_bias = nn.Linear(3, 4, bias=False).double()
    assert torch.allclose(dp_fast.per_member_sq_norms(no_bias, a, grad_out),
                          expected - grad_out.sum(1).pow(2).sum(1), rtol=1e-10)
    a2, g2 = a[:, 0], grad_out[:, 0]
    flat = torch.stack([torch.outer(g2[i], a2[i]).pow(2).sum() + g2[i].pow(2).sum() for i in range(5)])
    assert torch.allclose(dp_fast.per_member_sq_norms(layer, a2, g2), flat, rtol=1e-12)
    assert torch.allclose(dp_fast.per_member_sq_norms(no_bias, a2, g2), flat - g2.pow(2).sum(1), rtol=1e-12)


def test_clipped_sum_by_hand_for_flat_and_sequence_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    grad_out = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    c = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    layer = nn.Linear(2, 5).double()
    dp_fast.clipped_sum(layer, a, grad_out, c)
    assert torch.allclose(layer.weight.grad, sum(c[i] * grad_out[i].t() @ a[i] for i in range(4)))
    assert torch.allclose(layer.bias.grad, sum(c[i] * grad_out[i].sum(0) for i in range(4)))
    dp_fast.clipped_sum(layer, a[:, 0], grad_out[:, 0], c)
    assert torch.allclose(layer.weight.grad, sum(c[i] * torch.outer(grad_out[i, 0], a[i, 0]) for i in range(4)))
    assert torch.allclose(layer.bias.grad, sum(c[i] * grad_out[i, 0] for i in range(4)))
    bare = nn.Linear(2, 5, bias=False).double()
    dp_fast.clipped_sum(bare, a, grad_out, c)
    assert bare.bias is None and torch.allclose(bare.weight.grad, layer.weight.grad * 0 + sum(
        c[i] * grad_out[i].t() @ a[i] for i in range(4)))


def test_as_sequence_keeps_the_batch_and_last_dimension():
    t = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert dp_fast._as_sequence(t).shape == (2, 12, 5)
    assert torch.equal(dp_fast._as_sequence(t)[1, 4], t[1, 1, 0])


def test_linear_layers_and_their_refusals():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    for p in net[1].parameters():
        p.requires_grad_(False)
    assert dp_fast._linear_layers(net) == [net[0], net[2]]
    with pytest.raises(ValueError) as err:
        dp_fast._linear_layers(nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 1)))
    assert str(err.value) == ("the fast DP path supports nn.Linear layers only; also trainable: ['0.weight'] "
                              "(use dp-path = \"opacus\")")
    half = nn.Linear(2, 2)
    half.bias.requires_grad_(False)
    with pytest.raises(ValueError) as err:
        dp_fast._linear_layers(half)
    assert str(err.value) == "the fast DP path cannot train a Linear's weight with its bias frozen"


def test_a_linear_with_its_weight_frozen_trains_its_bias_by_the_sum_of_output_gradients():
    """Weight frozen, bias trained: a member's gradient is its output gradient (Σ_t g_t for a
    sequence), its squared norm ‖·‖², and the clipped sum Σ_i c_i g_i, by hand."""
    layer = nn.Linear(3, 2)
    layer.weight.requires_grad_(False)
    assert dp_fast._linear_layers(layer) == [layer]
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    g = torch.tensor([[3.0, 4.0], [0.5, -1.0]])
    assert dp_fast.per_member_sq_norms(layer, a, g).tolist() == [25.0, 1.25]
    dp_fast.clipped_sum(layer, a, g, torch.tensor([0.2, 1.0]))
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.bias.grad, torch.tensor([0.2 * 3 + 0.5, 0.2 * 4 - 1.0]), rtol=0, atol=1e-6)
    seq_g = torch.tensor([[[1.0, 0.0], [2.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]]])  # [B=2, T=2, out=2]
    seq_a = torch.zeros(2, 2, 3)
    assert dp_fast.per_member_sq_norms(layer, seq_a, seq_g).tolist() == [9.0 + 4.0, 4.0]  # (3, 2) and (0, 2)


def test_the_tap_records_once_per_forward_only_with_gradients_and_detaches():
    layer = nn.Linear(2, 2)
    tapped = dp_fast.TappedModule(layer)
    assert tapped.layers == [layer]
    with torch.no_grad():
        tapped(torch.ones(3, 2))
    assert tapped.records == {}
    x = torch.ones(3, 2)
    tapped(x)
    a, _, shape = tapped.records[layer]
    assert torch.equal(a, x) and not a.requires_grad and shape == (3, 2)
    with pytest.raises(RuntimeError) as err:
        layer(x)  # a second call within one forward
    assert str(err.value) == "the fast DP path needs each Linear layer called once per forward pass"
    tapped(x)  # a new forward starts afresh
    assert list(tapped.records) == [layer]
    tapped.remove_hooks()
    assert tapped.records == {} and tapped._handles == []
    tapped(x)
    assert tapped.records == {}


def _optimizer(layer, sigma, clip, batch, generator):
    return dp_fast.NoisyOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), sigma, clip, batch, generator)


def test_noise_is_sigma_c_from_the_generator_per_parameter_in_order_divided_by_the_batch():
    layer = nn.Linear(3, 2)
    grads = [torch.full_like(p, 2.0) for p in layer.parameters()]
    for p, g in zip(layer.parameters(), grads):
        p.grad = g.clone()
    opt = _optimizer(layer, 1.5, 0.4, 8, torch.Generator().manual_seed(7))
    assert opt.params == list(layer.parameters()) and (opt.noise_multiplier, opt.clip_norm) == (1.5, 0.4)
    opt.add_noise()
    replay = torch.Generator().manual_seed(7)
    for p, g in zip(layer.parameters(), grads):
        expected = (g + torch.normal(0.0, 1.5 * 0.4, size=p.shape, generator=replay)) / 8
        assert torch.allclose(p.grad, expected, rtol=1e-6, atol=0)


def test_secure_noise_replays_from_the_key_in_parameter_order():
    layer = nn.Linear(3, 2)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    _optimizer(layer, 2.0, 0.5, 4, SecureRandom(KEY, NONCE)).add_noise()
    replay = SecureRandom(KEY, NONCE)
    for p in layer.parameters():
        expected = (1.0 + torch.from_numpy(replay.gaussian(p.numel(), 1.0)).float().reshape(p.shape)) / 4
        assert p.grad.dtype == torch.float32 and torch.allclose(p.grad, expected, rtol=1e-6)


def test_no_noise_and_a_missing_gradient():
    layer = nn.Linear(2, 1)
    layer.weight.grad = torch.full_like(layer.weight, 6.0)
    g = torch.Generator().manual_seed(0)
    opt = _optimizer(layer, 0.0, 1.0, 3, g)
    opt.add_noise()
    assert torch.equal(layer.weight.grad, torch.full_like(layer.weight, 2.0))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))  # None became zeros
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn


def test_step_adds_noise_then_steps_and_zero_grad_clears():
    layer = nn.Linear(2, 1)
    before = [p.detach().clone() for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = torch.full_like(p, 4.0)
    opt = _optimizer(layer, 0.0, 1.0, 2, None)
    opt.step()  # lr 1: p − 4/2
    for p, b in zip(layer.parameters(), before):
        assert torch.allclose(p.detach(), b - 2.0)
    opt.zero_grad()
    assert all(p.grad is None for p in layer.parameters())
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())


def test_make_private_wires_one_tap_into_the_criterion():
    net = nn.Linear(2, 1)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator()
    tapped, opt, crit = dp_fast.make_private(net, sgd, _PerMember(), noise_multiplier=1.25, clip_norm=0.5,
                                             expected_batch_size=9, noise_generator=gen)
    assert crit.tapped is tapped and crit.clip_norm == 0.5 and tapped.layers == [net]
    assert (opt.original_optimizer, opt.noise_multiplier, opt.clip_norm, opt.expected_batch_size,
            opt.generator) == (sgd, 1.25, 0.5, 9, gen)
    loss = crit(tapped(torch.ones(2, 2)), torch.zeros(2, 1))
    assert loss.clip_norm == 0.5 and loss.tapped is tapped and loss.factors is None


class _DeadBranch(nn.Module):
    """A layer that is called but whose output does not reach the loss."""

    def __init__(self):
        super().__init__()
        self.live = nn.Linear(2, 1)
        self.dead = nn.Linear(2, 3)

    def forward(self, x):
        self.dead(x)
        return self.live(x)


def test_a_called_layer_that_does_not_reach_the_loss_gets_zero_gradients():
    torch.manual_seed(0)
    net = _DeadBranch()
    tapped = dp_fast.TappedModule(net)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    per_member = ((tapped(x) - y) ** 2).sum(1)
    loss = dp_fast.ClippedLoss(per_member, tapped, 100.0)
    loss.backward()
    assert torch.equal(net.dead.weight.grad, torch.zeros(3, 2)) and torch.equal(net.dead.bias.grad, torch.zeros(3))
    with torch.no_grad():  # not recorded: the tap records only with gradients on
        expected = sum(2 * (net.live(x[i:i + 1]) - y[i:i + 1]).item() * x[i] for i in range(4))  # nothing clipped
    assert torch.allclose(net.live.weight.grad[0], expected, rtol=1e-5)
