"""Decode and preprocessing on the CPU: does it run in parallel, and what does JPEG draft buy?

    .venv/bin/python bench/decode.py                  # ViT-B-32's preprocessing (224 px)
    .venv/bin/python bench/decode.py --seconds 5

1. Parallelism: images/s of decode + preprocess (PIL + open_clip's transform, the service's exact
   path) for 224x224, 640x480 and 1280x960 JPEGs with 1 thread, 2 threads and 2 processes. Two
   threads at ~2x one thread would mean the work releases the GIL; two processes are the bound.
2. JPEG draft (PROMPTSERVE_JPEG_DRAFT, opt-in): decoding at a DCT scale of 1/2..1/8 before the
   resize. Speed per image, and fidelity on the proving ground's test images (640 images of the
   source domain, upscaled to 640x480 and 1280x960 and encoded as JPEG): embedding cosine to the
   exact path and top-1 agreement, through the proving-ground CLIP (pre-trained on first use).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ((224, 224), (640, 480), (1280, 960))


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth random colour fields (noise alone would not compress)."""
    gen = torch.Generator().manual_seed(seed)
    small = (torch.rand(size[1] // 16 + 1, size[0] // 16 + 1, 3, generator=gen) * 255).byte()
    img = Image.fromarray(small.numpy()).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _preprocess(model: str):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model(model, pretrained=None))
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False), cfg["size"]


def _work(blob: bytes, model: str, seconds: float, draft: bool, out: list[int]) -> None:
    from service.images import ImageLimits, open_image

    preprocess, size = _preprocess(model) if not out else _CACHE[model]
    side = size[0] if isinstance(size, tuple) else size
    limits, n = ImageLimits(), 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        preprocess(open_image(blob, limits, side if draft else None))
        n += 1
    out.append(n)


_CACHE: dict = {}


def _proc(blob: bytes, model: str, seconds: float, q: mp.Queue) -> None:
    out: list[int] = []
    _work(blob, model, seconds, False, out)
    q.put(out[0])


def rate_threads(blob: bytes, model: str, seconds: float, threads: int, draft: bool) -> float:
    _CACHE.setdefault(model, _preprocess(model))
    counts: list[int] = [0]  # non-empty: use the cache
    ts = [
        threading.Thread(target=_work, args=(blob, model, seconds, draft, counts))
        for _ in range(threads)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def rate_procs(blob: bytes, model: str, seconds: float, procs: int) -> float:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    ps = [ctx.Process(target=_proc, args=(blob, model, seconds, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    return total / seconds


def fidelity(size: tuple[int, int]) -> dict:
    """Draft vs exact on the proving ground's test images through its trained CLIP."""
    from service.images import ImageLimits, open_image
    from service.training import proving_ground as pg

    bb = pg.build_backbone()
    test = pg.make_dataset(pg.SOURCE, "test", per_class=20, seed=0)
    plan = pg.zero_shot_plan(bb, test.classnames)
    side = bb.visual.image_size
    side = side[0] if isinstance(side, tuple) else side
    limits = ImageLimits()
    exact, drafted = [], []
    for img in test.images:
        buf = io.BytesIO()
        Image.fromarray(img.numpy()).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        blob = buf.getvalue()
        exact.append(bb.preprocess(open_image(blob, limits)))
        drafted.append(bb.preprocess(open_image(blob, limits, draft=side)))
    with torch.no_grad():
        fe = F.normalize(bb.encode_image(torch.stack(exact)).float(), dim=-1)
        fd = F.normalize(bb.encode_image(torch.stack(drafted)).float(), dim=-1)
    cos = (fe * fd).sum(-1)
    te, td = plan.logits(fe).argmax(-1), plan.logits(fd).argmax(-1)
    return {
        "images": len(test.images),
        "cosine_min": round(float(cos.min()), 4),
        "cosine_mean": round(float(cos.mean()), 4),
        "top1_agreement": round(float((te == td).float().mean()), 4),
        "accuracy_exact": round(float((te == test.labels).float().mean()), 4),
        "accuracy_draft": round(float((td == test.labels).float().mean()), 4),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--skip-fidelity", action="store_true")
    args = p.parse_args()
    print(f"decode + preprocess for {args.model}; {mp.cpu_count()} CPU cores")
    print("| JPEG | 1 thread img/s | 2 threads | x 1 thread | 2 processes | x 1 thread |"
          " draft, 1 thread | draft x exact |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in SIZES:
        blob = jpeg(size)
        one = rate_threads(blob, args.model, args.seconds, 1, False)
        two = rate_threads(blob, args.model, args.seconds, 2, False)
        procs = rate_procs(blob, args.model, args.seconds, 2)
        draft = rate_threads(blob, args.model, args.seconds, 1, True)
        print(
            f"| {size[0]}x{size[1]} | {one:.0f} | {two:.0f} | {two / one:.2f} | {procs:.0f} | "
            f"{procs / one:.2f} | {draft:.0f} | {draft / one:.2f} |"
        )
    if not args.skip_fidelity:
        print("\ndraft vs exact on the proving ground's test images (its CLIP):")
        for size in SIZES[1:]:
            print(f"  {size[0]}x{size[1]}: {fidelity(size)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
