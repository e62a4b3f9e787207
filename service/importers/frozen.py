"""The frozen CLIP tensors a reference file carries, checked against the served backbone.

Whole-model references (MaPLe, VPT, IVLP, PromptSRC) save the frozen CLIP with the prompts, and
every prompt learner saves `token_prefix`, the start-of-text embedding of each class prompt. These
are the file's evidence of the backbone it was trained on: a CoOp context trained on RN50 has the
same shape on ViT-B/16 and would be served wrong without a word. They are never imported (the
served backbone is used), but each must match its served tensor within the bound below, or the
import is refused with an error naming the tensor. Matches are ignored with a logged note of the
largest difference.

The bound, per element, compared at the coarser of the two precisions (fp16 for the references'
PREC "fp16"; u = half its machine epsilon, 2^-11; s = its smallest subnormal, 2^-24):

    |file - served| <= (N + 1) * u * |served| + N * s

Trainers that save the backbone as loaded give exact copies: N = 1, one unit in the last place.
PromptSRC replaces the whole state dict, frozen tensors included, with its Gaussian prompt
aggregation (GPA) over the N epochs, sum_e fl(w_e * W) with weights summing to 1, computed in the
file's precision. Each of the N products and N - 1 partial sums (at most |W|) rounds by at most
u times its magnitude, or s / 2 among subnormals: in all at most N * u * |W| + N * s; one more
rounding (u * |W|) when the two tensors are compared at the coarser precision. N is the file's
`epoch` (GPA averages every epoch; absent: 50, the longest PromptSRC schedule). On the reference
schedules the largest difference measured is 11 u |W|, the issue's "relative 1e-3". A different
backbone differs by the size of the weights themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.errors import BackboneMismatch
from service.importers.layouts import backbone_key, layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenCheck:
    """What the comparison found: how many tensors, the largest difference and where."""

    tensors: int
    max_diff: float
    worst: str
    max_fraction: float  # largest |difference| / bound over all elements (<= 1 when accepted)


def averaged_epochs(method: str, epoch: object) -> int:
    """N of the bound: the GPA epochs for PromptSRC, 1 for trainers that copy the backbone (the
    method's layout says)."""
    return layout(method).averaged_epochs(epoch)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _expected(
    key: str, backbone: ClipBackbone, served: Mapping[str, Tensor], like: Tensor
) -> Tensor | None:
    if key.endswith("token_prefix"):
        sos = backbone.embed_tokens(backbone.tokenize([""]))[0, :1].detach()
        return sos.expand(like.shape) if like.dim() == 3 and like.shape[1:] == sos.shape else sos
    name = backbone_key(key)
    if name is None:
        return None
    # CustomTextCLIP keeps the text tower under `text.`
    return served.get(name, served.get("text." + name))


@torch.no_grad()
def check_frozen(
    state: Mapping[str, Tensor], backbone: ClipBackbone, method: str, epoch: object = None
) -> FrozenCheck:
    """Compare every frozen tensor of the file with the served backbone; refuse beyond the bound."""
    n = averaged_epochs(method, epoch)
    served = backbone.model.state_dict()
    found = FrozenCheck(0, 0.0, "", 0.0)
    for key in sorted(state):
        if not (key.endswith("token_prefix") or backbone_key(key)):
            continue
        got = state[key]
        want = _expected(key, backbone, served, got)
        if want is None:
            raise BackboneMismatch(
                f"tensor {key!r} of the file has no counterpart in the served backbone "
                f"{backbone.model_name}: the checkpoint was trained on another architecture"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise BackboneMismatch(
                f"tensor {key!r} has shape {list(got.shape)} in the file but "
                f"{list(want.shape)} in the served backbone {backbone.model_name}: the checkpoint "
                "was trained on another backbone; serve it on that one"
            )
        if not (got.is_floating_point() and want.is_floating_point()):
            # integer buffers (BatchNorm's num_batches_tracked) are copied, never rounded
            if not torch.equal(got.cpu().long(), want.detach().cpu().long()):
                raise BackboneMismatch(f"tensor {key!r} differs from the served backbone")
            found = FrozenCheck(found.tensors + 1, found.max_diff, found.worst, found.max_fraction)
            continue
        low = _coarser(got.dtype, want.dtype)
        a, b = got.to(low).float(), want.detach().cpu().to(low).float()
        info = torch.finfo(low)
        subnormal = info.smallest_normal * info.eps  # 2^-24 for fp16
        bound = (n + 1) * (info.eps / 2) * b.abs() + n * subnormal
        ratio = (a - b).abs() / bound
        fraction = float(ratio.max()) if ratio.numel() else 0.0
        if not fraction <= 1.0:  # also catches NaN
            at = int(torch.nan_to_num(ratio, nan=float("inf")).flatten().argmax())
            raise BackboneMismatch(
                f"tensor {key!r} differs from the served backbone {backbone.model_name} by "
                f"{float((a - b).abs().flatten()[at]):.3g} at element {at} (served value "
                f"{float(b.flatten()[at]):.3g}, bound {float(bound.flatten()[at]):.3g} for "
                f"{n} averaged epoch(s)): the checkpoint was trained on another backbone"
            )
        top = float((a - b).abs().max()) if ratio.numel() else 0.0
        found = FrozenCheck(
            found.tensors + 1,
            max(found.max_diff, top),
            key if top > found.max_diff or not found.worst else found.worst,
            max(found.max_fraction, fraction),
        )
    if found.tensors:
        log.info(
            "ignored %d frozen backbone tensor(s) of the file: they match the served backbone "
            "(largest difference %.3g, in %s; %.0f%% of the bound for %d averaged epoch(s))",
            found.tensors,
            found.max_diff,
            found.worst,
            100 * found.max_fraction,
            n,
        )
    return found
