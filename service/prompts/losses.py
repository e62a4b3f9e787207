"""Loss terms beyond cross-entropy that methods' objectives use: PromptSRC's self-regularization
and the dual-view method's mutual information and class-wise visual augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def promptsrc_regularizers(
    text: Tensor,
    frozen_text: Tensor,
    image: Tensor,
    frozen_image: Tensor,
    logits: Tensor,
    frozen_logits: Tensor,
    text_weight: float,
    image_weight: float,
) -> Tensor:
    """PromptSRC's mutual-agreement losses against the frozen model (Khattak et al., ICCV 2023):
    L1 between prompted and frozen text features (x text_weight), L1 between prompted and frozen
    image features (x image_weight), and the KL divergence of the logits, summed over the batch
    and divided by the number of logits, as in the reference trainer."""
    l_text = F.l1_loss(text, frozen_text, reduction="mean") * text_weight
    l_image = F.l1_loss(image, frozen_image, reduction="mean") * image_weight
    l_logits = (
        F.kl_div(
            F.log_softmax(logits, dim=1),
            F.log_softmax(frozen_logits, dim=1),
            reduction="sum",
            log_target=True,
        )
        / logits.numel()
    )
    return l_text + l_image + l_logits


def view_mutual_information(soft: Tensor, hand: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE lower bound on the mutual information between the two text views: class c's soft
    prompt must pick out class c's hand-crafted prompt among all classes, and vice versa."""
    logits = soft @ hand.t() / temperature
    target = torch.arange(soft.shape[0], device=soft.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def classwise_mix(features: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Class-wise augmentation on the visual side: each normalized image feature is mixed with
    another feature of the same class in the batch (itself when it is alone), with a uniform
    weight, and renormalized: new views of a class that stay inside that class."""
    partner = torch.arange(len(labels), device=labels.device)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        perm = torch.randperm(len(idx), generator=generator).to(idx.device)
        partner[idx] = idx[perm]
    lam = torch.rand(len(labels), 1, generator=generator).to(features.device)
    return F.normalize(lam * features + (1 - lam) * features[partner], dim=-1)
