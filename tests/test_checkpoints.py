"""The checkpoint format: every validation failure is refused with its own typed error."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from service import errors
from service.checkpoints import dump, load, materialize, new_manifest, parse
from service.errors import http_status
from service.prompts import get_method


def _good(backbone, classnames, method="maple"):
    m = get_method(method)
    cfg = m.config({"depth": 2}) if method == "maple" else m.config()
    params = m.init(backbone, cfg, classnames, seed=0)
    return params, new_manifest("eurosat", method, backbone, classnames, cfg.model_dump())


def test_good_checkpoint_loads_and_carries_manifest(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    ckpt = load(dump(params, manifest), backbone)
    m = ckpt.manifest
    assert (m.name, m.method, m.format) == ("eurosat", "maple", 1)
    assert m.backbone.fingerprint == backbone.fingerprint
    assert set(ckpt.params) == set(params)
    assert materialize(ckpt, backbone).labels == tuple(classnames)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(backbone, classnames, value):
    params, manifest = _good(backbone, classnames)
    params["ctx"][0, 0] = value
    with pytest.raises(errors.NonFiniteTensor, match="ctx"):
        load(dump(params, manifest), backbone)


def test_wrong_shape(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    params["ctx"] = torch.zeros(3, backbone.text_width)
    with pytest.raises(errors.ShapeMismatch, match=r"ctx.*\[3, 48\].*\[2, 48\]"):
        load(dump(params, manifest), backbone)


def test_missing_and_extra_tensors(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    missing = {k: v for k, v in params.items() if k != "proj.bias"}
    with pytest.raises(errors.MissingTensor, match=r"proj\.bias"):
        load(dump(missing, manifest), backbone)
    with pytest.raises(errors.ExtraTensor, match="surprise"):
        load(dump({**params, "surprise": torch.zeros(1)}, manifest), backbone)


def test_wrong_dtype(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    tensors = {k: v.contiguous() for k, v in params.items()}
    tensors["ctx"] = tensors["ctx"].half()
    data = st_save(tensors, metadata={"promptserve": manifest.model_dump_json()})
    with pytest.raises(errors.DtypeMismatch, match="float32"):
        load(data, backbone)


def test_foreign_backbone_fingerprint(backbone, other_backbone, classnames):
    params, manifest = _good(backbone, classnames)
    with pytest.raises(errors.BackboneMismatch, match="retrain"):
        load(dump(params, manifest), other_backbone)


def test_unknown_method(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    manifest.method = "telepathy"
    with pytest.raises(errors.UnknownMethod, match="known methods"):
        load(dump(params, manifest), backbone)


def test_invalid_method_config(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    manifest.method_config = {"depth": "deep"}
    with pytest.raises(errors.InvalidConfig):
        load(dump(params, manifest), backbone)


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "non-empty"),
        (["cat", ""], "empty"),
        (["cat", "   "], "empty"),
        (["cat", "Cat "], "same after normalization"),
        (["cat", "c" * 10_000], "characters"),
        (["cat", "dog\x00"], "control"),
        (["cat", "dog\u202e"], "control"),
    ],
)
def test_bad_classnames(backbone, classnames, names, message):
    params, manifest = _good(backbone, classnames)
    manifest.classnames = names
    with pytest.raises(errors.InvalidClassnames, match=message):
        load(dump(params, manifest), backbone)


def test_bad_templates(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    manifest.templates = ["a photo of {0} and {}"]
    with pytest.raises(errors.InvalidClassnames, match="template"):
        load(dump(params, manifest), backbone)


def test_pickle_renamed_safetensors_is_refused(backbone):
    data = pickle.dumps({"ctx": [1.0, 2.0]})
    with pytest.raises(errors.MalformedCheckpoint, match="promptserve import"):
        parse(data)


def test_torch_pth_is_refused(backbone, tmp_path):
    path = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 48)}}, path)
    with pytest.raises(errors.MalformedCheckpoint):
        parse(path.read_bytes())


def test_header_lying_about_offsets(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    data = dump(params, manifest)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**6
    raw = json.dumps(header).encode()
    forged = struct.pack("<Q", len(raw)) + raw + data[8 + size :]
    with pytest.raises(errors.MalformedCheckpoint, match="corrupt"):
        parse(forged)
    huge = struct.pack("<Q", 2**60) + data[8:]
    with pytest.raises(errors.MalformedCheckpoint, match="header length"):
        parse(huge)


def test_size_bound_and_missing_manifest(backbone, classnames):
    params, manifest = _good(backbone, classnames)
    data = dump(params, manifest)
    with pytest.raises(errors.CheckpointTooLarge):
        parse(data, max_bytes=len(data) - 1)
    bare = st_save({"ctx": torch.zeros(2, 2)})
    with pytest.raises(errors.MalformedCheckpoint, match="no promptserve manifest"):
        parse(bare)
    with pytest.raises(errors.MalformedCheckpoint):
        parse(b"\x01\x02")


def test_every_checkpoint_error_has_a_4xx_status():
    for cls in (
        errors.MalformedCheckpoint,
        errors.UnknownMethod,
        errors.MissingTensor,
        errors.ExtraTensor,
        errors.ShapeMismatch,
        errors.DtypeMismatch,
        errors.NonFiniteTensor,
        errors.BackboneMismatch,
        errors.InvalidClassnames,
        errors.InvalidConfig,
    ):
        assert http_status(cls("x")) == 422, cls
    assert http_status(errors.CheckpointTooLarge("x")) == 413
    assert http_status(errors.StoreUnavailable("x")) == 503


@pytest.mark.parametrize("meta", [["promptserve"], "promptserve", {"promptserve": 7}, [1, 2], 7])
def test_a_metadata_block_of_the_wrong_type_is_malformed_not_a_crash(meta):
    """`"promptserve" in meta` is true for a list or a string holding it: indexing it then was a
    TypeError (a 500 on upload)."""
    import json
    import struct

    header = json.dumps({"__metadata__": meta}).encode()
    with pytest.raises(errors.MalformedCheckpoint):
        parse(struct.pack("<Q", len(header)) + header)
