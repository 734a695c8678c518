"""Spectral normalisation (Miyato et al., 2018) that trains the same under ``torch.compile`` as in eager mode.

PyTorch's ``torch.nn.utils.parametrizations.spectral_norm`` updates its power-iteration vectors ``u`` and ``v``
in place inside every training forward and clones them before use, so that a discriminator can be called
twice (real, fake) before one backward. A compiled graph drops that clone: TorchInductor saves the buffer
itself for the backward pass, the second forward's in-place update bumps the buffer's version, and the backward
fails with autograd's "modified by an inplace operation" error (the failure that made ``Compile`` refuse the
GANs). Here the power iteration runs eagerly, once per forward of the whole net, before the (compiled) forward,
and gives each buffer a new tensor instead of overwriting it: a tensor saved for a backward pass is never
written again. The values are those of PyTorch's parametrisation (same initialisation, random draws, iteration
and ``sigma``, bit for bit in eager mode), and so are the state-dict keys (``<layer>.parametrizations.weight.
original``, ``....0._u``, ``....0._v``): checkpoints written before load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SpectralNorm(nn.Module):
    """Parametrisation ``W -> W / sigma(W)`` with ``sigma = u^T W v`` from the buffers ``u`` and ``v``.

    The forward never changes ``u`` or ``v``; :meth:`power_iteration` (run by :func:`update_spectral_norms`
    before each training forward) replaces them.
    """

    _u: torch.Tensor
    _v: torch.Tensor

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(f"spectral_norm needs a weight with 2 or more dimensions; got shape {tuple(weight.shape)}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations={n_power_iterations}; expected a positive integer")
        self.dim = dim if dim >= 0 else dim + weight.ndim
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        with torch.no_grad():
            mat = self.matrix(weight)
            h, w = mat.shape
            u = mat.new_empty(h).normal_(0, 1)  # the draws of PyTorch's parametrisation, in its order
            v = mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
            self.power_iteration(weight, 15)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as a matrix whose rows run along ``dim``."""
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, n: int | None = None) -> None:
        """``n`` (default ``n_power_iterations``) power-iteration steps; ``u`` and ``v`` become new tensors."""
        mat = self.matrix(weight.detach())
        u, v = self._u, self._v
        for _ in range(self.n_power_iterations if n is None else n):
            u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
            v = F.normalize(torch.mv(mat.H, u), dim=0, eps=self.eps)
        self._u, self._v = u, v  # rebinds the buffers: tensors saved for a pending backward stay intact

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = torch.vdot(self._u, torch.mv(self.matrix(weight), self._v))
        return weight / sigma


def spectral_norm(
    module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12
) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.<name>`` (PyTorch's ``dim`` choice: 1 for transposed convs).

    The net that holds ``module`` must run :func:`update_spectral_norms` before each training forward; the
    GANs' discriminators register :func:`power_iteration_hook` for that.
    """
    weight = getattr(module, name)
    dim = 1 if isinstance(module, _TRANSPOSED) else 0
    sn = SpectralNorm(weight, n_power_iterations, dim, eps)
    parametrize.register_parametrization(module, name, sn)
    sn.power_iteration(weight)  # PyTorch's registration runs its parametrisation (one more iteration) once
    return module


@torch.compiler.disable
def update_spectral_norms(net: nn.Module) -> None:
    """One power-iteration step of every :class:`SpectralNorm` of ``net`` in training mode (eagerly, uncompiled)."""
    for module in net.modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for chain in plist.values():
            first = chain[0]  # the parametrisation that sees the original weight
            if isinstance(first, SpectralNorm) and first.training:
                first.power_iteration(chain.original)


def _pre_forward(net: nn.Module, args: object) -> None:
    if net.training:
        update_spectral_norms(net)


def power_iteration_hook(net: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make every training forward of ``net`` start with :func:`update_spectral_norms` (PyTorch's schedule)."""
    return net.register_forward_pre_hook(_pre_forward)
