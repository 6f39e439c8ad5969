"""Parameter shifts from (key, value-gradient) rows, and their meta-gradients (spec §6.5, §6.6, §7.1).

All functions work in the (d_in, d_out) layout: ``K`` is N × d_k, ``V`` is N × d_v and a shift
``ΔW`` is d_k × d_v. The ridge solve ``(KᵀK + e^λ I)⁻¹ KᵀV`` is computed in whichever of its two
equal forms is cheaper: the primal d_k × d_k system, or the dual N × N system
``Kᵀ(KKᵀ + e^λ I)⁻¹V`` when there are fewer rows than key dimensions.
"""

from __future__ import annotations

import torch


def _use_dual(keys: torch.Tensor, solver: str) -> bool:
    if solver == "primal":
        return False
    if solver == "dual":
        return True
    if solver == "auto":
        return keys.shape[0] < keys.shape[1]
    raise ValueError(f"unknown solver {solver!r}; expected auto, primal or dual")


def ridge_shift(
    keys: torch.Tensor, values: torch.Tensor, lamda: torch.Tensor | float, solver: str = "auto"
) -> torch.Tensor:
    """The least-squares shift ``ΔW = (KᵀK + e^λ I)⁻¹ KᵀV`` (spec §6.5)."""
    reg = torch.exp(torch.as_tensor(lamda, dtype=keys.dtype))
    if _use_dual(keys, solver):
        gram = keys @ keys.T
        gram.diagonal().add_(reg)
        return keys.T @ torch.linalg.solve(gram, values)
    gram = keys.T @ keys
    gram.diagonal().add_(reg)
    return torch.linalg.solve(gram, keys.T @ values)


def ridge_metagrad(
    keys: torch.Tensor,
    shift: torch.Tensor,
    grad_w: torch.Tensor,
    lamda: torch.Tensor | float,
    solver: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic ∂L/∂V and ∂L/∂λ of the ridge shift, given Γ = ∂L/∂ΔW (spec §6.6).

    With A = KᵀK + e^λ I and M = A⁻¹Γ: ∂L/∂V = K M and ∂L/∂λ = −e^λ ⟨M, ΔW⟩.
    """
    reg = torch.exp(torch.as_tensor(lamda, dtype=keys.dtype))
    if _use_dual(keys, solver):
        gram = keys @ keys.T
        gram.diagonal().add_(reg)
        k_gamma = keys @ grad_w  # N × d_v
        inner = torch.linalg.solve(gram, k_gamma)  # (KKᵀ + e^λ I)⁻¹ K Γ
        dv = inner  # K A⁻¹ Γ = (KKᵀ + e^λ I)⁻¹ K Γ  (push-through identity)
        m = (grad_w - keys.T @ inner) / reg  # A⁻¹ Γ via Woodbury
    else:
        gram = keys.T @ keys
        gram.diagonal().add_(reg)
        m = torch.linalg.solve(gram, grad_w)
        dv = keys @ m
    dlamda = -reg * (m * shift).sum()
    return dv, dlamda


def outer_shift(pseudo_keys: torch.Tensor, pseudo_grads: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """MEND's shift as in the EMSEdit repository: ``ΔW = −lr · Σ_i k̃_i g̃_iᵀ`` (spec §7.1)."""
    return -lr * (pseudo_keys.T @ pseudo_grads)
