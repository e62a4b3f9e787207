"""Importing M²PT outputs in the layout of the paper's code (William-wAng618/M2PT) onto LLaVA.

The files are written here with the reference's key names and per-layer `[1, n, d]` layout, next
to frozen-model keys the importer must ignore, sharded as transformers 4.31's `save_pretrained`
shards them (`pytorch_model-0000N-of-0000M.bin` + `pytorch_model.bin.index.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from service.backbones.llava import LlavaBackbone
from service.checkpoints import materialize
from service.cli import main
from service.errors import BackboneMismatch, InvalidContent, MalformedCheckpoint
from service.importers.m2pt import import_m2pt
from service.prompts.m2pt import M2PT, batch_prompts

VIS = "model.vision_tower.vision_tower.vision_model.encoder.prompts.{}"
TXT = "model.prompts.{}"


def reference_state(
    llava: LlavaBackbone, nv: int = 4, nt: int = 5, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """What train_PT.py's save_model writes, on LLaVA-1.5's two-layer projector: the whole model
    in LLaVA's key names (bf16), the prompts (scaled to matter) and a trained projector."""
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, value in llava.model.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.vision_tower."):
            rest = key.removeprefix("model.vision_tower.")
            rest = rest if rest.startswith("vision_model.") else "vision_model." + rest
            state["model.vision_tower.vision_tower." + rest] = value
        elif key == "lm_head.weight":
            state[key] = value
    clip_layers = len(llava.tower.encoder.layers)  # the reference prompts every CLIP layer
    for i in range(clip_layers):
        state[VIS.format(i)] = torch.randn(1, nv, llava.vision_width, generator=gen) * 2
    for i in range(llava.text_layers):
        state[TXT.format(i)] = torch.randn(1, nt, llava.text_width, generator=gen) * 2
    for ref, ours in (("0", "linear_1"), ("2", "linear_2")):
        for part in ("weight", "bias"):
            frozen = llava.projector.state_dict()[f"{ours}.{part}"]
            state[f"model.mm_projector.{ref}.{part}"] = frozen + 0.3 * torch.randn(
                frozen.shape, generator=gen
            )
    return {k: v.to(dtype) for k, v in state.items()}  # the recipe's run saves bf16


def expected_params(
    llava: LlavaBackbone, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our tensors built directly: the used visual layers, every textual layer, the projector."""
    f = state
    return {
        "visual_prompts": torch.cat([f[VIS.format(i)] for i in range(llava.vision_layers)]),
        "text_prompts": torch.cat([f[TXT.format(i)] for i in range(llava.text_layers)]),
        "projector.linear_1.weight": f["model.mm_projector.0.weight"],
        "projector.linear_1.bias": f["model.mm_projector.0.bias"],
        "projector.linear_2.weight": f["model.mm_projector.2.weight"],
        "projector.linear_2.bias": f["model.mm_projector.2.bias"],
    }


def write_sharded(state: dict[str, torch.Tensor], out: Path) -> Path:
    out.mkdir()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2]}
    shards["pytorch_model-00002-of-00002.bin"] = keys[1::2]
    weight_map = {}
    for fname, ks in shards.items():
        torch.save({k: state[k] for k in ks}, out / fname)
        weight_map.update(dict.fromkeys(ks, fname))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def answer(llava: LlavaBackbone, prompts: object) -> list[list[int]]:
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    rows = [llava.encode_chat(msg, 1, prompts.n_visual)]  # type: ignore[attr-defined]
    pixels = llava.pixel_values([Image.new("RGB", (40, 40), (200, 30, 30))])
    return llava.greedy(rows, pixels, prompts, max_new_tokens=8)  # type: ignore[arg-type]


def test_sharded_output_imports_and_answers_as_our_tensors(
    llava: LlavaBackbone, tmp_path: Path
) -> None:
    state = reference_state(llava)
    ckpt, _ = import_m2pt(write_sharded(state, tmp_path / "run"), name="ref", backbone=llava)
    want = expected_params(llava, state)
    assert set(ckpt.params) == set(want)
    for k, v in want.items():
        assert torch.equal(ckpt.params[k], v), k
    cfg = ckpt.manifest.method_config
    assert (cfg["n_visual"], cfg["n_text"], cfg["train_projector"]) == (4, 5, True)
    assert not cfg["train_head"] and "head.weight" not in ckpt.params  # its head is the base's
    assert ckpt.manifest.metrics["equal_to_base"] == len(llava.model.state_dict()) - 4
    # feature layer -2: the last layer's prompt is written into the selected state, so all count
    assert cfg["visual_depth"] == llava.vision_layers == len(llava.tower.encoder.layers)
    method = M2PT()
    direct = method.prompts(want, 1, llava.dtype)
    imported = batch_prompts([materialize(ckpt, llava)], llava.dtype)  # type: ignore[arg-type]
    got = answer(llava, imported)
    assert got == answer(llava, direct)
    assert got != answer(llava, M2PT().prompts({}, 1, llava.dtype))  # the prompts matter


def test_safetensors_file_and_frozen_projector(llava: LlavaBackbone, tmp_path: Path) -> None:
    state = reference_state(llava, nv=2, nt=3, dtype=torch.float32)  # a run without --bf16
    for ours, ref in (("linear_1", "0"), ("linear_2", "2")):  # projector left frozen in the run
        for part in ("weight", "bias"):
            state[f"model.mm_projector.{ref}.{part}"] = llava.projector.state_dict()[
                f"{ours}.{part}"
            ].clone()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    ckpt, _ = import_m2pt(path, name="frozen", backbone=llava)
    assert ckpt.manifest.method_config["train_projector"] is False
    assert ckpt.manifest.method_config["dtype"] == "float32"  # a float32 save stays float32
    assert set(ckpt.params) == {"visual_prompts", "text_prompts"}
    assert tuple(ckpt.params["text_prompts"].shape) == (llava.text_layers, 3, llava.text_width)


def test_bad_reference_files_are_clear_errors(llava: LlavaBackbone, tmp_path: Path) -> None:
    state = reference_state(llava)
    del state[TXT.format(1)]  # a hole in the layers
    with pytest.raises(MalformedCheckpoint, match=r"layers 0\.\.N"):
        import_m2pt(write_sharded(state, tmp_path / "hole"), name="x", backbone=llava)
    empty = tmp_path / "empty.bin"
    torch.save({k: v for k, v in reference_state(llava).items() if "prompts" not in k}, empty)
    with pytest.raises(MalformedCheckpoint, match="no M²PT prompts"):
        import_m2pt(empty, name="x", backbone=llava)
    wide = reference_state(llava)
    for i in range(llava.text_layers):  # the paper's 7B width on the tiny model
        wide[TXT.format(i)] = torch.zeros(1, 5, 4096)
    with pytest.raises(InvalidContent):  # a ShapeMismatch: one model's prompts on another
        import_m2pt(write_sharded(wide, tmp_path / "wide"), name="x", backbone=llava)
    wide[TXT.format(0)] = torch.zeros(1, 6, 4096)
    with pytest.raises(MalformedCheckpoint, match="differ in shape"):
        import_m2pt(write_sharded(wide, tmp_path / "ragged"), name="x", backbone=llava)
    with pytest.raises(InvalidContent, match="does not exist"):
        import_m2pt(tmp_path / "nowhere", name="x", backbone=llava)


def test_cli_import_m2pt(
    llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.checkpoints import parse

    src = write_sharded(reference_state(llava_from_dir(llava_dir)), tmp_path / "run")
    out = tmp_path / "ref.safetensors"
    argv = ["import", str(src), "--method", "m2pt", "--name", "ref", "--out", str(out)]
    argv += ["--backbone", "llava", "--model", str(llava_dir), "--pretrained", str(llava_dir)]
    assert main(argv) == 0
    assert "4 visual and 5 textual" in capsys.readouterr().out
    manifest = parse(out.read_bytes()).manifest
    assert (manifest.method, manifest.name, manifest.classnames) == ("m2pt", "ref", [])


def llava_from_dir(path: Path) -> LlavaBackbone:
    from service.backbones.llava_loading import load_llava

    return load_llava(str(path), str(path))


def test_a_single_linear_projector_on_a_two_layer_base_is_a_base_mismatch(
    llava: LlavaBackbone, tmp_path: Path
) -> None:
    """LLaVA v1's one Linear has linear_1's shape on LLaVA-1.5: it must not slip in before the
    base's second layer (serve a v1 base: promptserve convert-base)."""
    state = {k: v for k, v in reference_state(llava).items() if "mm_projector" not in k}
    state["model.mm_projector.weight"] = torch.zeros(llava.text_width, llava.vision_width)
    state["model.mm_projector.bias"] = torch.zeros(llava.text_width)
    path = write_sharded(state, tmp_path / "v1")
    with pytest.raises(BackboneMismatch, match="one Linear projector"):
        import_m2pt(path, name="v1", backbone=llava)
    (path / "config.json").write_text(json.dumps({"mm_hidden_size": llava.vision_width}))
    with pytest.raises(BackboneMismatch, match="mm_projector_type linear"):
        import_m2pt(path, name="v1", backbone=llava)
