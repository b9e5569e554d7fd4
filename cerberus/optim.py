"""Muon for conv filters with SGD for everything else, as one optimizer.

Muon (Jordan et al., 2024, used by the fastest CIFAR-10 trainers) replaces each filter bank's
momentum update by its nearest semi-orthogonal matrix, found by a few Newton-Schulz iterations:
every direction of the update moves by about the same amount, however unevenly the gradient is
spread over them. Parameters that are not filter banks (BatchNorm, biases, the classifier) keep
SGD. One optimizer holds both kinds, so checkpoints, resume, ``GradScaler`` and the schedule see
a single ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.optim.sgd import sgd

# Quintic Newton-Schulz coefficients chosen for the steepest slope at zero: 3 iterations take the
# leading singular values of a normalised matrix into roughly [0.5, 1.5] (not exactly 1; the
# smallest ones grow less), which trains as well as an exact orthogonalisation at a fraction of
# an SVD's cost.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3


def orthogonalize(matrix: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """About ``U V^T`` of ``matrix = U S V^T`` by Newton-Schulz iterations; float32 ``(..., m, n)``,
    a stack of matrices orthogonalised each on its own. Zero columns (or rows) appended to a
    matrix stay zero and leave the rest as it would be without them (up to rounding), so
    matrices of different widths can share one stack, zero-padded."""
    a, b, c = NS_COEFFICIENTS
    # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    x = matrix / (torch.linalg.matrix_norm(matrix, keepdim=True) + eps)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    for _ in range(steps):
        gram = x @ x.mT
        # x = a x + (b gram + c gram^2) x, in two fused multiply-adds
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


class MuonSGD(torch.optim.Optimizer):
    """Muon steps for groups marked ``muon=True``, SGD steps for the others.

    SGD groups follow ``torch.optim.SGD`` (momentum, Nesterov, L2 weight decay, no dampening).
    A Muon group's parameters (filter banks, ``(out, in, k, k)``) each step: momentum buffer
    ``m = momentum * m + g``; update ``u = g + momentum * m`` with Nesterov, else ``m``; the weights
    rescaled to a Frobenius norm of ``sqrt(out)`` (a BatchNorm follows each filter bank, so its
    scale carries no meaning, and a fixed scale keeps the step size meaningful); then
    ``w -= lr * orthogonalize(u reshaped to (out, in*k*k))``. Muon groups take no weight decay.
    """

    def __init__(self, params: Iterable[dict], *, lr: float, momentum: float, nesterov: bool):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above 0")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "muon": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices and filter banks, not vectors")
            if group["muon"] and group["weight_decay"]:
                raise ValueError("Muon groups take no weight decay (their weights keep a fixed norm)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._sgd_step(group)
        return loss

    def _sgd_step(self, group: dict) -> None:
        """``torch.optim.SGD``'s step, through its functional form (foreach kernels on GPUs)."""
        params = [p for p in group["params"] if p.grad is not None]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params,
            [p.grad for p in params],
            buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"]:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer

    def _muon_step(self, group: dict) -> None:
        """The group's steps in multi-tensor (``_foreach``) calls and a few batched
        orthogonalisations: on a GPU a kernel launch per filter bank and operation costs more
        host time than the arithmetic."""
        momentum, lr = group["momentum"], group["lr"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        # the weights rescaled to a Frobenius norm of sqrt(out) before the step
        scales = torch._foreach_norm(params)
        torch._foreach_clamp_min_(scales, 1e-12)
        torch._foreach_reciprocal_(scales)
        torch._foreach_mul_(scales, [p.size(0) ** 0.5 for p in params])
        torch._foreach_mul_(params, scales)
        # one batched Newton-Schulz product per row count (short side first), the narrower
        # matrices zero-padded: fewer launches on a GPU, and faster on a 2-core CPU as well
        buckets: dict[int, list[tuple[int, torch.Tensor, bool]]] = {}
        for i, update in enumerate(updates):
            flat = update.reshape(len(update), -1).float()
            tall = flat.size(0) > flat.size(1)
            if tall:  # the short side first
                flat = flat.mT
            buckets.setdefault(flat.size(0), []).append((i, flat, tall))
        steps: dict[int, torch.Tensor] = {}
        for members in buckets.values():
            width = max(flat.size(1) for _, flat, _ in members)
            stack = torch.stack(
                [
                    flat if flat.size(1) == width else F.pad(flat, (0, width - flat.size(1)))
                    for _, flat, _ in members
                ]
            )
            for (i, flat, tall), step in zip(members, orthogonalize(stack)):
                step = step[:, : flat.size(1)]
                steps[i] = (step.mT if tall else step).reshape(params[i].shape).to(params[i].dtype)
        torch._foreach_add_(params, [steps[i] for i in range(len(params))], alpha=-lr)
