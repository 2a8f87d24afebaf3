"""Model files: round trip, exact resumption, atomic writes, and clear errors for files
that are truncated, corrupted, foreign or from a newer sagd."""
import json
import os
import zipfile

import numpy as np
import pytest

import sagd
from sagd.datasets import load_digits
from sagd.files import ModelFileError

X, Y = load_digits()
X, Y = X[:400], Y[:400]


@pytest.fixture(scope="module")
def model():
    return sagd.fit(X, Y, hidden=(24,), epochs=2, seed=1)


@pytest.mark.parametrize("weights", sagd.FORMATS)
def test_round_trip_keeps_every_bit(tmp_path, weights):
    m = sagd.fit(X, np.array(["a", "b", "c"])[Y % 3], hidden=(16,), epochs=1,
                 weights=weights, seed=2)
    path = tmp_path / "m.sagd"
    m.save(path)
    back = sagd.load(path)
    for a, b in zip(m.network.layers, back.network.layers):
        for name, t in a.tensors().items():
            u = b.tensors()[name]
            assert u.codes.dtype == t.codes.dtype and np.array_equal(u.codes, t.codes)
            if t.scales is not None:
                assert np.array_equal(u.scales, t.scales)
    assert back.classes.tolist() == ["a", "b", "c"]
    assert np.array_equal(back.predict(X), m.predict(X))
    assert back.step == m.step and back.epoch == m.epoch
    if weights == "bf16":   # stored as is: 2 bytes per weight in the file
        assert os.path.getsize(path) < 3 * 2 * m.network.n_params + 16_000


@pytest.mark.parametrize("weights,optimizer", [("bf16", "adam"), ("int8", "sgd"),
                                               ("fp16", "adamw")])
def test_save_after_n_steps_load_train_m_more_is_bit_identical(tmp_path, weights, optimizer):
    kw = dict(hidden=(20,), weights=weights, optimizer=optimizer, batch_size=32, seed=7,
              lr=1e-2 if optimizer == "sgd" else 1e-3, schedule="invscaling")
    straight = sagd.Model(**kw)
    for _ in range(3):
        straight.partial_fit(X, Y, classes=np.arange(10))
    resumed = sagd.Model(**kw)
    resumed.partial_fit(X, Y, classes=np.arange(10))
    resumed.save(tmp_path / "a.sagd")
    resumed = sagd.load(tmp_path / "a.sagd")
    resumed.partial_fit(X, Y)
    resumed.save(tmp_path / "b.sagd")
    resumed = sagd.load(tmp_path / "b.sagd")
    resumed.partial_fit(X, Y)
    assert resumed.step == straight.step
    for a, b in zip(straight.network.layers, resumed.network.layers):
        for name, t in a.tensors().items():
            assert np.array_equal(t.codes, b.tensors()[name].codes), name


def test_fit_epochs_equal_fit_save_load_continue(tmp_path):
    kw = dict(hidden=(20,), batch_size=50, seed=9)
    two = sagd.fit(X, Y, epochs=2, **kw)
    one = sagd.fit(X, Y, epochs=1, **kw)
    one.save(tmp_path / "one.sagd")
    cont = sagd.load(tmp_path / "one.sagd").partial_fit(X, Y)
    for a, b in zip(two.network.layers, cont.network.layers):
        assert np.array_equal(a.W.codes, b.W.codes)


def test_failed_save_leaves_the_previous_file_intact(tmp_path, model, monkeypatch):
    path = tmp_path / "m.sagd"
    model.save(path)
    before = path.read_bytes()

    def explode(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.sagd"], "no temporary file left"


def test_saving_to_an_unwritable_place_raises(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="the folder .* does not exist"):
        model.save(tmp_path / "no" / "such" / "dir" / "m.sagd")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        model.save(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        sagd.load(tmp_path)


def test_truncated_file(tmp_path, model):
    path = tmp_path / "m.sagd"
    model.save(path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.sagd"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated or corrupted|not a readable"):
            sagd.load(bad)


def test_corrupted_bytes_are_detected(tmp_path, model):
    path = tmp_path / "m.sagd"
    model.save(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("layers.0.W.codes.npy")
    pos = info.header_offset + 30 + len(info.filename) + 200      # inside the weights
    data[pos] ^= 0xFF
    bad = tmp_path / "flip.sagd"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupted"):
        sagd.load(bad)


def test_foreign_and_newer_files(tmp_path, model):
    foreign = tmp_path / "data.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(ModelFileError, match="not a sagd model file"):
        sagd.load(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable sagd model"):
        sagd.load(text)
    path = tmp_path / "m.sagd"
    model.save(path)
    newer = tmp_path / "newer.sagd"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "header.json":
                h = json.loads(data)
                h["version"] = 99
                data = json.dumps(h).encode()
            dst.writestr(item, data)
    with pytest.raises(ModelFileError, match="newer sagd .*version 99"):
        sagd.load(newer)
    with pytest.raises(FileNotFoundError):
        sagd.load(tmp_path / "missing.sagd")
