"""Reading local torch files without executing anything: what Dassl writes is read (its optimizer
and scheduler objects as inert records, no code of theirs run), anything else is refused by name
before it runs, and archives with unsafe member names are refused."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from service.cli import main
from service.errors import InvalidContent, MalformedCheckpoint
from service.importers.dassl import read_checkpoint
from service.importers.torchfile import Inert, RestrictedUnpickler, read_torch_file
from tests.importers.dassl_files import save_dassl


def _dassl_file(tmp_path, warmup=True):
    state = {"prompt_learner.ctx": torch.randn(4, 8).half(), "logit_scale": torch.tensor(4.6)}
    return save_dassl(tmp_path / "model.pth.tar-5", state, ["prompt_learner.ctx"], 5, 5, warmup)


def test_the_pickle_holds_the_objects_weights_only_refuses(tmp_path):
    path = _dassl_file(tmp_path)
    with pytest.raises(Exception, match="CosineAnnealingLR"):
        torch.load(path, weights_only=True)  # the issue: what `import` did before


def test_dassl_file_is_read_and_no_optimizer_or_scheduler_code_runs(tmp_path, monkeypatch):
    path = _dassl_file(tmp_path)
    calls = []

    def spy(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran")

        return record

    # every way the real classes could come to life while unpickling
    for cls in (torch.optim.SGD, torch.optim.Optimizer, CosineAnnealingLR):
        for attr in ("__init__", "__setstate__", "__new__"):
            if attr in vars(cls):
                monkeypatch.setattr(cls, attr, spy(f"{cls.__name__}.{attr}"))
    obj = read_torch_file(path)
    assert calls == []
    state = obj["state_dict"]
    assert state["prompt_learner.ctx"].dtype == torch.float16 and obj["epoch"] == 5
    successor = obj["scheduler"]["successor"]
    assert isinstance(successor, Inert)
    assert successor.global_name == "torch.optim.lr_scheduler.CosineAnnealingLR"
    optimizer = successor.state["optimizer"]
    assert optimizer.global_name == "torch.optim.sgd.SGD"  # a record, not an SGD
    assert not isinstance(optimizer, torch.optim.Optimizer)
    momentum = obj["optimizer"]["state"][0]["momentum_buffer"]
    assert momentum.shape == (4, 8)
    assert read_checkpoint(path)[1] == 5


def test_plain_scheduler_without_warmup(tmp_path):
    # CoOp/rn50_val.yaml keeps Dassl's defaults: no warmup, a StepLR (its state is plain data)
    state, epoch = read_checkpoint(_dassl_file(tmp_path, warmup=False))
    assert set(state) == {"prompt_learner.ctx", "logit_scale"} and epoch == 5


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.zeros(2, 4)}, "epoch": _Evil(marker)}, path)
    # the same file does run its payload when unpickled the ordinary way
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(MalformedCheckpoint, match=r"global (posix|nt|os)\.system"):
        read_torch_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, refused",
    [
        (b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval"),
        (b"csubprocess\nPopen\n(S'true'\ntR.", "subprocess.Popen"),
        (b"ctorch\nload\n(S'x'\ntR.", "torch.load"),
        (b"ccollections\nOrderedDict\n)R(S'a'\nI1\nuS'x'\nb.", None),  # BUILD: state dropped
    ],
)
def test_unpickler_calls_only_the_allow_list(payload, refused):
    reader = RestrictedUnpickler(io.BytesIO(payload))
    if refused is None:
        assert reader.load() == {"a": 1}
    else:
        with pytest.raises(pickle.UnpicklingError, match=refused.replace(".", r"\.")):
            reader.load()


def test_build_on_anything_but_a_placeholder_is_refused():
    # a tensor rebuilt from the archive must not get a pickled state (Tensor.__setstate__)
    build_on_list = b"(lp0\n(dp1\nb."  # BUILD on a list
    with pytest.raises(pickle.UnpicklingError, match="BUILD on a list"):
        RestrictedUnpickler(io.BytesIO(build_on_list)).load()
    for payload in (b"]S'a'\nK\x01s.", b"}K\x01a.", b"}(K\x01e."):  # items into the wrong type
        with pytest.raises(pickle.UnpicklingError, match="items added to a"):
            RestrictedUnpickler(io.BytesIO(payload)).load()
    inst = b"(ibuiltins\ndict\n."  # INST: class lookup + call outside REDUCE
    with pytest.raises(pickle.UnpicklingError, match="opcode"):
        RestrictedUnpickler(io.BytesIO(inst)).load()


def _with_member(path, name, data=b"x", compress=zipfile.ZIP_STORED):
    """Add a member to a torch archive; `{top}` in the name is the archive's own folder."""
    with zipfile.ZipFile(path, "a", compression=compress) as z:
        top = z.namelist()[0].split("/")[0]
        z.writestr(name.format(top=top), data)
    return path


@pytest.mark.parametrize(
    "member",
    ["../../escaped.txt", "{top}/../../escaped.txt", "/tmp/escaped.txt", "{top}\\..\\x"],
)
def test_archive_with_path_traversal_member_is_refused(tmp_path, member):
    path = _with_member(_dassl_file(tmp_path), member)
    with pytest.raises(MalformedCheckpoint, match="unsafe member name"):
        read_torch_file(path)
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not (tmp_path.parent.parent / "escaped.txt").exists()


def test_archives_torch_does_not_write_are_refused(tmp_path):
    compressed = _with_member(
        _dassl_file(tmp_path / "a"), "{top}/extra", b"0" * 999, zipfile.ZIP_DEFLATED
    )
    with pytest.raises(MalformedCheckpoint, match="compressed"):
        read_torch_file(compressed)
    script = _with_member(_dassl_file(tmp_path / "b"), "{top}/constants.pkl")
    with pytest.raises(MalformedCheckpoint, match="TorchScript"):
        read_torch_file(script)
    legacy = tmp_path / "legacy.pth"
    torch.save({"ctx": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(MalformedCheckpoint, match="not a torch zip archive"):
        read_torch_file(legacy)
    with pytest.raises(InvalidContent, match="does not exist"):
        read_torch_file(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(MalformedCheckpoint):
        read_torch_file(garbage)


def test_promptserve_import_refuses_it_cleanly(backbone, classnames, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.zeros(2, 48)}, "epoch": _Evil(marker)}, path)
    (tmp_path / "classes.txt").write_text("\n".join(classnames))
    monkeypatch.setattr("service.cli.load_backbone", lambda settings: backbone)
    argv = ["import", str(path), "--name", "x", "--classnames", str(tmp_path / "classes.txt")]
    assert main([*argv, "--out", str(tmp_path / "x.safetensors"), "--pretrained", "none"]) == 2
    assert "malformed_checkpoint" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()
