"""The CUDA-graph runtime: bucketing, padding, slicing and fallback on the CPU (capture and replay
injected), and parity with eager torch where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from service.engine.runtimes.cudagraph import PLAIN, CudaGraphRuntime, bucket_for, buckets


class FakeCapture:
    """Records captures; a replay recomputes the forward from the static buffers, as a real
    graph replay would (so stale or unpadded buffers would show up as wrong features)."""

    def __init__(self) -> None:
        self.captured: list[dict[str, tuple[int, ...]]] = []
        self.replayed: list[int] = []

    def __call__(self, forward, static):
        self.captured.append({k: tuple(v.shape) for k, v in static.items()})

        def replay():
            self.replayed.append(static["images"].shape[0])
            return forward(static)

        return replay


def test_buckets_and_bucket_choice():
    assert buckets(32) == (1, 2, 4, 8, 16, 32)
    assert buckets(24) == (1, 2, 4, 8, 16, 24)
    assert buckets(1) == (1,)
    sizes = buckets(24)
    assert [bucket_for(b, sizes) for b in (1, 2, 3, 5, 16, 17, 24)] == [1, 2, 4, 8, 16, 24, 24]
    assert bucket_for(25, sizes) is None
    with pytest.raises(ValueError):
        buckets(0)


def test_warm_up_captures_every_bucket_largest_first(backbone):
    fake = FakeCapture()
    rt = CudaGraphRuntime(backbone, 8, capture=fake)
    rt.warm_up()
    assert [c["images"][0] for c in fake.captured] == [8, 4, 2, 1]
    assert all("tokens" not in c for c in fake.captured)
    assert rt.describe()["graphs"] == 4
    rt.warm_up()  # idempotent
    assert len(fake.captured) == 4


def test_padding_slicing_and_bias_match_eager(backbone):
    fake = FakeCapture()
    rt = CudaGraphRuntime(backbone, 8, capture=fake)
    rt.warm_up()
    x = torch.randn(3, 3, 32, 32)
    bias = torch.randn(3, 2, backbone.vision_width) * 0.1  # shallower than the tower: padded
    got = rt.encode(x, None, bias, "append")
    assert got.shape[0] == 3 and fake.replayed == [4]
    assert (got - backbone.encode_image(x, None, bias)).abs().max() <= 1e-5
    # the next, bias-free batch must not see the previous batch's biases or images
    y = torch.randn(2, 3, 32, 32)
    assert (rt.encode(y, None, None, "append") - backbone.encode_image(y)).abs().max() <= 1e-5
    assert fake.replayed == [4, 2] and rt.replays == 2 and rt.fallbacks == 0


def test_signatures_are_captured_on_first_use(backbone):
    fake = FakeCapture()
    rt = CudaGraphRuntime(backbone, 4, capture=fake)
    tokens = torch.randn(3, 2, 5, backbone.vision_width) * 0.1
    x = torch.randn(3, 3, 32, 32)
    for placement in ("append", "prepend"):
        ref = backbone.encode_image(x, tokens, None, placement)
        assert (rt.encode(x, tokens, None, placement) - ref).abs().max() <= 1e-5
    assert [c["tokens"] for c in fake.captured] == [(4, 2, 5, backbone.vision_width)] * 2
    rt.encode(x[:1], tokens[:1], None, "append")
    assert len(fake.captured) == 3  # a new bucket of a known signature: one more graph


def test_eager_fallback_outside_the_buckets_and_past_the_graph_cap(backbone):
    fake = FakeCapture()
    rt = CudaGraphRuntime(backbone, 4, capture=fake, max_graphs=1)
    x = torch.randn(5, 3, 32, 32)
    assert (rt.encode(x, None, None, "append") - backbone.encode_image(x)).abs().max() == 0
    assert rt.fallbacks == 1 and not fake.captured
    rt.encode(x[:2], None, None, "append")  # captured: the one graph allowed
    rt.encode(x[:1], None, None, "append")  # cap reached: eager
    assert len(fake.captured) == 1 and rt.fallbacks == 2 and rt.replays == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_graph_parity_on_the_gpu(backbone, dtype):
    import copy
    from dataclasses import replace

    import torch.nn.functional as F

    gpu = replace(
        backbone,
        model=copy.deepcopy(backbone.model).to("cuda", dtype),
        device=torch.device("cuda"),
        dtype=dtype,
    )
    rt = CudaGraphRuntime(gpu, 8)
    rt.warm_up()
    assert rt.describe()["graphs"] == 4
    x = torch.randn(5, 3, 32, 32)
    tokens = torch.randn(5, 2, 3, gpu.vision_width) * 0.1
    bias = torch.randn(5, 3, gpu.vision_width) * 0.1
    for t in (None, tokens):
        ref = backbone.encode_image(x, t, bias, "append")  # eager fp32 on the CPU
        got = rt.encode(x.cuda(), None if t is None else t.cuda(), bias.cuda(), "append")
        got = got.float().cpu()
        if dtype == torch.float32:  # against eager on the same device: the same kernels
            eager = gpu.encode_image(x.cuda(), None if t is None else t.cuda(), bias.cuda())
            assert (got - eager.float().cpu()).abs().max() <= 1e-4
            assert F.cosine_similarity(got, ref).min() >= 0.999
        else:
            assert F.cosine_similarity(got, ref).min() >= 0.999
    assert rt.replays == 2 and rt.fallbacks == 0
    assert PLAIN == (0, 0, "append")
