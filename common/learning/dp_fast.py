"""DP-SGD in one backward pass ("book-keeping", after Bu et al. 2022/2023).

The mechanism is exactly the one Opacus runs with Poisson sampling (and so the one the
ledger accounts): per-member gradients of the loss, each clipped to ``C`` as a whole
(all parameters together), summed, plus Gaussian noise ``N(0, (σC)²)`` per coordinate,
divided by the expected batch size. Only the arithmetic differs.

Every trainable parameter must live in an ``nn.Linear`` (checked). For such a layer with
input rows ``a_i`` and output gradients ``g_i`` of member ``i``:

* the member's weight gradient is ``g_i a_iᵀ``; its squared norm is ``‖a_i‖²‖g_i‖²`` for a
  2-D input, and for a sequence input ``[B, T, ·]`` either materialised (small layers) or
  ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` (the Gram form); the bias adds ``‖Σ_t g_t‖²``;
* the clipped sum ``Σ_i c_i g_i a_iᵀ`` is one matrix product ``Gᵀ (c ⊙ A)``.

So one forward pass records each layer's input ``A`` and output ``Z``; one backward pass
(``autograd.grad`` to the outputs ``Z`` only, which skips the unclipped weight gradients)
yields every ``G``; norms and clipped sums follow from ``(A, G)``. Opacus' ghost clipping
needs a second full backward pass instead.

The interface mirrors what ``PrivacyEngine.make_private`` returns (module with
``remove_hooks``, optimizer with ``params``/``original_optimizer``, a criterion whose
result has ``backward``), so :func:`common.learning.training.train_local` runs either path with the
same loop. Sampling is Opacus' Poisson sampler (drawn by the caller); noise is drawn per
parameter, in parameter order, with the given generator, as Opacus draws it. With a
:class:`~common.privacy.secure_noise.SecureRandom` instead (deployed stores), the noise comes
from its ChaCha20 stream as the sum of four normals (Opacus' secure-mode mitigation), and
the caller draws the Poisson batches from the same stream.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from common.privacy.secure_noise import SecureRandom

# Opacus' clip factor: C / (‖g‖ + 1e-6), at most 1.
_NORM_EPS = 1e-6


class TappedModule(nn.Module):
    """The model, with each trainable ``nn.Linear``'s input and output recorded per forward."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = module
        self.layers = _linear_layers(module)
        self.records: dict[nn.Linear, tuple[torch.Tensor, GradientEdge, torch.Size]] = {}
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, layer: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if layer in self.records:
            # Two calls would need their contributions summed per member before the norm.
            raise RuntimeError("the fast DP path needs each Linear layer called once per forward pass")
        # The output's gradient edge, not the output: holding the tensor would keep a
        # [B, catalog] buffer alive through the backward pass that plain training frees.
        self.records[layer] = (inputs[0].detach(), get_gradient_edge(output), output.shape)

    def forward(self, *args, **kwargs):
        self.records = {}
        return self._module(*args, **kwargs)

    def remove_hooks(self) -> None:
        """Detach from the model (the model itself is trained in place and stays as it is)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.records = {}


def _linear_layers(module: nn.Module) -> list[nn.Linear]:
    """Trainable Linear layers; raises if any trainable parameter lives elsewhere."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)
              and any(p.requires_grad for p in m.parameters(recurse=False))]
    covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
    other = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if other:
        raise ValueError(f"the fast DP path supports nn.Linear layers only; also trainable: {other} "
                         "(use dp-path = \"opacus\")")
    for m in layers:
        if m.bias is not None and not m.bias.requires_grad and m.weight.requires_grad:
            raise ValueError("the fast DP path cannot train a Linear's weight with its bias frozen")
    return layers


def _as_sequence(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., k] → [B, T, k]: every middle dimension is one sequence."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _bias_grads(g: torch.Tensor) -> torch.Tensor:
    """Each member's bias gradient, [B, out]: ``g`` itself, or Σ_t g_t for a sequence."""
    return g if g.dim() == 2 else _as_sequence(g).sum(1)


def per_member_sq_norms(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared norm of each member's gradient of ``layer`` (its trainable weight and bias), [B]."""
    if not layer.weight.requires_grad:  # only the bias trains
        return _bias_grads(g).pow(2).sum(1)
    if a.dim() == 2:
        # vector_norm is one fused pass; g.pow(2).sum(1) would write a [B, out] temporary.
        g_sq = torch.linalg.vector_norm(g, dim=1).square()
        sq = torch.linalg.vector_norm(a, dim=1).square() * g_sq
        return sq + g_sq if layer.bias is not None else sq
    a, g = _as_sequence(a), _as_sequence(g)
    steps, n_in, n_out = a.shape[1], a.shape[2], g.shape[2]
    if n_in * n_out <= steps * steps:
        # Small layer: the per-member gradients themselves are the cheapest route.
        sq = torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2))
    else:
        sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return sq + g.sum(1).pow(2).sum(1) if layer.bias is not None else sq


def clipped_sum(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor) -> None:
    """Set the layer's ``.grad`` to ``Σ_i c_i ∇_i`` (its trainable weight and bias)."""
    if not layer.weight.requires_grad:
        layer.bias.grad = factors @ _bias_grads(g)
        return
    if a.dim() == 2:
        layer.weight.grad = g.t() @ (a * factors[:, None])
        if layer.bias is not None:
            layer.bias.grad = factors @ g
        return
    a, g = _as_sequence(a), _as_sequence(g)
    layer.weight.grad = torch.einsum("bto,bti->oi", g, a * factors[:, None, None])
    if layer.bias is not None:
        layer.bias.grad = factors @ g.sum(1)


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """[B] bool: member ``i``'s slice of ``t`` holds only finite values."""
    return torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)


def _zero_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with the slices of members not in ``keep`` set to exactly 0."""
    mask = keep.reshape((-1,) + (1,) * (t.dim() - 1))
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype))


class ClippedLoss:
    """The batch loss (mean over members, for reporting) whose ``backward`` sets each
    parameter's ``.grad`` to the sum of per-member gradients clipped to ``clip_norm``."""

    def __init__(self, per_member: torch.Tensor, tapped: TappedModule, clip_norm: float) -> None:
        self.per_member = per_member
        self.tapped = tapped
        self.clip_norm = clip_norm
        self.factors: torch.Tensor | None = None  # c_i, kept for inspection and tests
        self.finite: torch.Tensor | None = None  # which members counted (c_i = 0 for the others)

    def detach(self) -> torch.Tensor:
        """The mean loss over the members whose loss is finite (0 when none is): the
        reported value must stay a number whatever model the server sent."""
        loss = self.per_member.detach()
        finite = torch.isfinite(loss)
        return loss[finite].mean() if bool(finite.any()) else loss.new_zeros(())

    def backward(self) -> None:
        records = [(layer, *self.tapped.records[layer]) for layer in self.tapped.layers
                   if layer in self.tapped.records]
        self.tapped.records = {}
        edges = [edge for _, _, edge, _ in records]
        # Gradients to the layer outputs only: the unclipped weight gradients are never formed.
        grads = torch.autograd.grad(self.per_member.sum(), edges, allow_unused=True)
        batch = self.per_member.shape[0]
        sq = torch.zeros(batch, dtype=self.per_member.dtype)
        # A member counts only when everything of theirs is finite: loss, every layer's
        # input and output gradient rows, and the norm. Decided per member, from that
        # member's rows alone (DESIGN §4.2, "any model"): a member whose forward pass a
        # crafted model overflows contributes exactly zero, as if absent, instead of
        # turning the whole noised sum into NaN (a membership oracle).
        finite = torch.isfinite(self.per_member.detach())
        pairs = []
        for (layer, a, _, shape), g in zip(records, grads):
            g = torch.zeros(shape, dtype=a.dtype) if g is None else g.detach()
            finite &= _finite_rows(a) & _finite_rows(g)
            sq += per_member_sq_norms(layer, a, g)
            pairs.append((layer, a, g))
        finite &= torch.isfinite(sq)
        self.finite = finite
        factors = (self.clip_norm / (sq.sqrt() + _NORM_EPS)).clamp(max=1.0)
        self.factors = torch.where(finite, factors, torch.zeros_like(factors))
        if not bool(finite.all()):
            # 0 · NaN is NaN: the rows themselves are zeroed, not just their factors.
            pairs = [(layer, _zero_rows(a, finite), _zero_rows(g, finite)) for layer, a, g in pairs]
        del grads
        used: set[nn.Linear] = set()
        while pairs:  # each G is freed as soon as its layer is done
            layer, a, g = pairs.pop()
            clipped_sum(layer, a, g, self.factors)
            used.add(layer)
        for layer in self.tapped.layers:
            if layer not in used:  # not called this pass: no member moved it
                for p in layer.parameters(recurse=False):
                    p.grad = torch.zeros_like(p)


class ClippingCriterion:
    """Wraps a loss with a ``reduction`` attribute; returns :class:`ClippedLoss`."""

    def __init__(self, criterion: nn.Module, tapped: TappedModule, clip_norm: float) -> None:
        self.criterion = criterion
        self.criterion.reduction = "none"
        self.tapped = tapped
        self.clip_norm = clip_norm

    def __call__(self, *args, **kwargs) -> ClippedLoss:
        return ClippedLoss(self.criterion(*args, **kwargs), self.tapped, self.clip_norm)


class NoisyOptimizer:
    """``step``: ``.grad`` (the clipped sum) + N(0, (σC)²) per coordinate, ÷ expected batch
    size, then the wrapped optimizer's step."""

    def __init__(self, optimizer: torch.optim.Optimizer, noise_multiplier: float, clip_norm: float,
                 expected_batch_size: int, generator: torch.Generator | SecureRandom | None = None) -> None:
        self.original_optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.expected_batch_size = expected_batch_size
        self.generator = generator

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.original_optimizer.param_groups for p in group["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.clip_norm
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if std > 0:
                p.grad.add_(self._noise(std, p))
            p.grad.div_(self.expected_batch_size)

    def _noise(self, std: float, p: torch.Tensor) -> torch.Tensor:
        if isinstance(self.generator, SecureRandom):
            drawn = self.generator.gaussian(p.numel(), std)
            return torch.from_numpy(drawn).to(p.dtype).reshape(p.shape)
        return torch.normal(0.0, std, size=p.shape, generator=self.generator)

    def step(self) -> None:
        self.add_noise()
        self.original_optimizer.step()


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
                 noise_multiplier: float, clip_norm: float, expected_batch_size: int,
                 noise_generator: torch.Generator | SecureRandom | None = None):
    """``(module, optimizer, criterion)`` for DP-SGD with the one-pass path.

    The caller draws the Poisson batches (:class:`common.learning.training.PoissonBatches`,
    Opacus' sampler) and gives the divisor of the noised sum, ``expected_batch_size``:
    Opacus' ``int(N · q)`` with N the store's published size, not its exact count.
    """
    tapped = TappedModule(module)
    return (tapped, NoisyOptimizer(optimizer, noise_multiplier, clip_norm, expected_batch_size, noise_generator),
            ClippingCriterion(criterion, tapped, clip_norm))
