"""Losses used in meta-training (spec §6.7, §7.5.4).

``cross_entropy`` and ``kl_locality`` work on logits that are already aligned with ``labels``
(labels are pre-shifted, spec §4.2): position i of the logits predicts ``labels[i]``. They take a
mini-batch's (batch × width × vocab) logits, or only its scored rows (rows × vocab, labels rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy, the mean over positions with ``labels != -100``."""
    logits, labels = _scored(logits, labels)
    return F.cross_entropy(logits.float(), labels)


def _scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (rows × vocab) and labels at the scored positions; no copy when every row is scored."""
    mask = labels != -100
    if logits.dim() == 2 and bool(mask.all()):
        return logits, labels
    return logits[mask], labels[mask]


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary at the answer positions only (rows × vocab)."""
    return F.log_softmax(_scored(logits, labels)[0].float(), dim=-1)


def kl_locality(ref_log_probs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_edited) summed over the vocabulary, averaged over answer positions.

    ``ref_log_probs`` comes from :func:`answer_log_probs` on the model before the current edit.
    """
    log_p = answer_log_probs(logits, labels)
    return F.kl_div(log_p, ref_log_probs, log_target=True, reduction="batchmean")


def l2_weight_change(weights: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over modules of the squared Frobenius norm ‖W − W_orig‖²_F (the norm term, unscaled)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, w in weights.items():
        total = total + (w.double() - originals[name].double()).square().sum()
    return total


def l2_weight_change_grad(
    weight: torch.Tensor, original: torch.Tensor, eta: float
) -> torch.Tensor:
    """Gradient of ``eta · ‖W − W_orig‖²_F`` with respect to W: ``2·eta·(W − W_orig)``.

    The editors add this analytically to ∂L/∂W instead of back-propagating through a graph.
    """
    return 2.0 * eta * (weight.float() - original.float())
