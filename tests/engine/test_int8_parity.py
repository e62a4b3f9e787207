"""int8 ONNX on the proving ground's test set, against eager fp32, on a trained backbone (random
weights would make the comparison meaningless).

Why not "the same top-1 for every image": int8 GEMM kernels differ by CPU (VNNI or AVX2 u8s8 with
saturation, ORT version), so the int8 features move by a CPU-dependent ~1e-3 in cosine. An image
whose two best classes are nearly tied under eager can then flip; that is quantization noise, not
a bug. A bug (a wrong scale, a mis-wired prompt input) moves *confident* predictions. So the bar:
- cosine >= 0.99 to eager for every image (the quantization bar of the fast path);
- top-1 agreement >= 99% (measured here: 636/640 on one x86 CPU);
- every disagreement is a near-tie under eager: its top-2 logit margin is < 0.5, where the
  median margin is ~3.3 and the flips measured here had margins of 0.002-0.11. 0.5 leaves room
  for other CPUs' noise while a systematic error would flip images with margins of whole logits.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from service.engine.forward import encode
from service.engine.runtimes.onnx import OnnxRuntime
from service.training import proving_ground as pg

MIN_AGREEMENT = 0.99
NEAR_TIE_LOGITS = 0.5


@pytest.fixture(scope="module")
def proving():
    """The proving-ground CLIP (pre-trained on first use, ~2 min on 2 cores; cached after)."""
    return pg.build_backbone()


def test_int8_matches_eager_on_the_test_set(proving, tmp_path):
    # The source domain: where zero-shot is meaningful (~95% top-1). On the shifted domains it is
    # near chance, every prediction is a near-tie, and top-1 agreement would measure coin flips.
    test = pg.make_dataset(pg.SOURCE, "test", per_class=20, seed=0)
    images = pg.to_model_input(test.images, proving)
    plan = pg.zero_shot_plan(proving, test.classnames)
    plans = [plan] * len(images)
    rt = OnnxRuntime(proving, tmp_path, int8=True)
    eager = encode(proving, images, plans)
    int8 = encode(proving, images, plans, runtime=rt)
    assert F.cosine_similarity(int8, eager).min() >= 0.99
    eager_logits, int8_logits = plan.logits(eager), plan.logits(int8)
    flips = eager_logits.argmax(-1) != int8_logits.argmax(-1)
    assert 1 - flips.float().mean().item() >= MIN_AGREEMENT
    top2 = eager_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1])[flips]
    assert (margins < NEAR_TIE_LOGITS).all(), f"confident predictions flipped: {margins.tolist()}"
    # and the backbone is a trained one: eager zero-shot is far above chance (1/32)
    assert (eager_logits.argmax(-1) == test.labels).float().mean() > 0.8
