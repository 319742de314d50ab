"""toolkit.model.weights: hashing, reading weight files without pickle, strict loading."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from toolkit.errors import TkError
from toolkit.model.weights import load_into, read_state_dict, sha256_file


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sha256_file(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_read_pth_and_safetensors(tmp_path):
    sd = _model().state_dict()
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    _assert_same(read_state_dict(tmp_path / "w.pth"), sd)
    _assert_same(read_state_dict(tmp_path / "w.safetensors"), sd)


def test_safetensors_recognised_by_content(tmp_path):
    sd = _model().state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "weights.bin"))
    _assert_same(read_state_dict(tmp_path / "weights.bin"), sd)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"model": {"state_dict": sd}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
])
def test_common_wrappers_unwrapped(tmp_path, wrap):
    sd = _model().state_dict()
    torch.save(wrap(sd), tmp_path / "ckpt.pth")
    _assert_same(read_state_dict(tmp_path / "ckpt.pth"), sd)


@pytest.mark.parametrize("name,content", [
    ("garbage.pth", b"this is not a weights file at all\n" * 10),
    ("garbage.safetensors", b"\x00\x01\x02 definitely not safetensors"),
    ("empty.pth", b""),
])
def test_damaged_file_is_one_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TkError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert name in msg and "\n" not in msg
    assert "Traceback" not in msg


def test_truncated_pth(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(TkError, match="cut.pth"):
        read_state_dict(tmp_path / "cut.pth")


class Payload:  # a pickled object that weights_only loading must refuse
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"w": Payload()}, fh)
    with pytest.raises(TkError) as info:
        read_state_dict(path)
    assert "evil.pth" in str(info.value)
    assert "unpickled!" not in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(TkError, match="no state dict"):
        read_state_dict(tmp_path / "meta.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(TkError, match="no state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_missing_file(tmp_path):
    with pytest.raises(TkError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(TkError, match="not a file"):
        read_state_dict(tmp_path)


def test_load_into_exact():
    src, dst = _model(), _model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    load_into(dst, src.state_dict())
    _assert_same(dst.state_dict(), src.state_dict())


def test_load_into_ignores_prefixes():
    src = _model()
    dst = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Identity())
    load_into(dst, src.state_dict(), ignore_prefixes=("3.",))
    assert torch.equal(dst[0].weight, src[0].weight)


def test_load_into_reports_missing_unexpected_and_shapes():
    model = _model()
    sd = dict(model.state_dict())
    del sd["0.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["3.weight"] = torch.zeros(5, 4)
    with pytest.raises(TkError) as info:
        load_into(model, sd, what="for test:model")
    msg = str(info.value)
    assert "for test:model" in msg
    assert "0.weight" in msg and "extra.weight" in msg and "3.weight" in msg
    assert "[5, 4]" in msg and "[2, 4]" in msg
    assert "\n" not in msg
