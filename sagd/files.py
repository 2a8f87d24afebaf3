"""Model files: one portable zip archive (no pickle) holding a JSON header and the tensors
as stored (bf16 stays 2 bytes per weight), written atomically and checked on reading.

Layout: header.json, then one .npy entry per array ("layers.0.W.codes.npy",
"layers.0.W.scales.npy", "layers.0.mW.codes.npy", ..., "classes.npy"). The header names
every entry with its dtype, shape and SHA-256.
"""
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile

import numpy as np

from . import _kernels, blas
from .budget import Spec, plan_fit
from .formats import FORMATS, bias_format
from .model import DEFAULTS, Model, _optimizer_kw, check_settings
from .network import Network
from .optim import Optimizer
from .trainer import Trainer

MAGIC = "sagd-model"
VERSION = 1


class ModelFileError(ValueError):
    """A file that is not a readable sagd model: truncated, corrupted, foreign, or newer."""


def _settings_for_json(settings):
    s = {k: settings[k] for k in DEFAULTS}
    s["hidden"] = list(s["hidden"])
    if callable(s["schedule"]):
        s["schedule"] = "callable"
    return s


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _arrays(model):
    out = {}
    for i, layer in enumerate(model.network.layers):
        for name, t in layer.tensors().items():
            out[f"layers.{i}.{name}.codes"] = t.codes
            if t.scales is not None:
                out[f"layers.{i}.{name}.scales"] = t.scales
    if model.classes is not None:
        classes = model.classes
        if classes.dtype == object:
            kinds = {type(c) for c in classes}
            if kinds <= {str}:
                classes = classes.astype(str)
            else:
                raise ValueError("labels of dtype object cannot be saved without pickle; "
                                 "use labels of a numpy dtype (ints, floats, strings)")
        out["classes"] = classes
    return out


def _write(model, f):
    """The model file's bytes, into the binary file object f."""
    tr = model.trainer
    arrays = _arrays(model)
    header = {
        "format": MAGIC, "version": VERSION,
        "settings": _settings_for_json(model.settings_checked),
        "task": model.task, "n_features": model.n_features, "n_outputs": model.n_outputs,
        "target_ndim": model.target_ndim, "target_bytes": model.target_bytes,
        "sizes": list(model.network.sizes),
        "trainer": {"step": tr.step, "epoch": tr.epoch, "seed": tr.seed,
                    "stochastic": tr.stochastic, "lr_scale": tr.lr_scale,
                    "total_steps": tr.total_steps, "loss_curve": tr.loss_curve,
                    "validation_scores": tr.validation_scores,
                    "best_loss": tr.best_loss if np.isfinite(tr.best_loss) else None,
                    "best_score": tr.best_score if np.isfinite(tr.best_score) else None,
                    "no_improvement": tr.no_improvement},
        "plan": tr.plan.to_dict(),
        "arrays": {},
    }
    blobs = {}
    for name, arr in arrays.items():
        data = _npy_bytes(arr)
        blobs[name] = data
        header["arrays"][name] = {"dtype": arr.dtype.str, "shape": list(arr.shape),
                                  "sha256": hashlib.sha256(data).hexdigest()}
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("header.json", json.dumps(header, indent=1))
        for name, data in blobs.items():
            z.writestr(name + ".npy", data)


def to_bytes(model):
    buf = io.BytesIO()
    _write(model, buf)
    return buf.getvalue()


def from_bytes(data):
    return _read(io.BytesIO(data), "<bytes>")


def save(model, path):
    """Write model to path atomically (see write_atomically): a failure leaves any previous
    file untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path}: it is a directory; give a file name")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path}: the folder {folder} does not exist")
    write_atomically(path, lambda f: _write(model, f))


def write_atomically(path, write, mode="wb"):
    """write(f) into a temporary file in path's folder, flushed to disk, then renamed over
    path: a failure at any point leaves any previous file at path untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):      # make the rename itself durable (POSIX)
        try:
            dfd = os.open(folder, os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def _fail(path, why):
    raise ModelFileError(f"{path}: {why}")


def _read_header(z, path):
    try:
        raw = z.read("header.json")
    except KeyError:
        _fail(path, "not a sagd model file (it has no header.json)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"the header is corrupted ({e})")
    if not isinstance(header, dict) or header.get("format") != MAGIC:
        _fail(path, "not a sagd model file (its header is not a sagd model's)")
    version = header.get("version")
    if not isinstance(version, int):
        _fail(path, "the header has no format version")
    if version > VERSION:
        _fail(path, f"written by a newer sagd (file format version {version}); this sagd "
                    f"reads up to version {VERSION}: upgrade sagd to load it")
    return header


def _read_array(z, path, name, info):
    try:
        data = z.read(name + ".npy")
    except KeyError:
        _fail(path, f"the array {name} is missing (truncated file?)")
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        _fail(path, f"the array {name} is corrupted (checksum mismatch)")
    arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if arr.dtype.str != info["dtype"] or list(arr.shape) != info["shape"]:
        _fail(path, f"the array {name} does not match the header")
    return arr


def load(path):
    """Read a model written by save, checking everything it reads."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a model file")
    return _read(path, path)


def _read(source, path):
    try:
        with zipfile.ZipFile(source) as z:
            header = _read_header(z, path)
            arrays = {name: _read_array(z, path, name, info)
                      for name, info in header.get("arrays", {}).items()}
    except zipfile.BadZipFile as e:
        _fail(path, f"not a readable sagd model file: truncated or corrupted ({e})")
    except (OSError, EOFError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        _fail(path, f"truncated or corrupted ({e})")
    try:
        return _rebuild(header, arrays, path)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        _fail(path, f"inconsistent model file ({type(e).__name__}: {e})")


def _rebuild(header, arrays, path):
    settings = dict(header["settings"])
    callable_schedule = settings.get("schedule") == "callable"
    if callable_schedule:
        settings["schedule"] = "constant"
        warnings.warn(f"{path}: the model was trained with a callable learning-rate "
                      "schedule, which a file cannot hold; it continues with the constant "
                      f"lr={settings['lr']}", RuntimeWarning, stacklevel=3)
    s = check_settings(settings)
    if s["weights"] not in FORMATS:
        _fail(path, f"unknown weight format {s['weights']!r}")
    model = Model(**{k: s[k] for k in DEFAULTS})
    sizes = tuple(int(v) for v in header["sizes"])
    optimizer = Optimizer(**_optimizer_kw(s))
    net = Network(sizes, s["activation"], s["weights"])
    net.add_states(optimizer.n_states, s["state"])
    for i, layer in enumerate(net.layers):
        for name, t in list(layer.tensors().items()):
            key = f"layers.{i}.{name}"
            codes = arrays.get(key + ".codes")
            scales = arrays.get(key + ".scales")
            if codes is None or codes.shape != t.codes.shape or codes.dtype != t.codes.dtype:
                _fail(path, f"{key} is missing or has the wrong shape or dtype")
            if t.scales is not None:
                if scales is None or scales.shape != t.scales.shape:
                    _fail(path, f"{key} has no valid scales")
                if not np.all(np.isfinite(scales) & (scales > 0)):
                    _fail(path, f"{key} has scales that are not positive and finite")
            fmt = t.format
            stored = _kernels.Stored(np.ascontiguousarray(codes), fmt, t.tensor_id,
                                     None if scales is None else np.ascontiguousarray(scales))
            if name == "W":
                layer.W = stored
            elif name == "b":
                layer.b = stored
            else:
                layer.states[name] = stored
        if layer.b.format != bias_format(s["weights"]):
            _fail(path, "bias format does not match the weights")
    spec = Spec(sizes=sizes, activation=s["activation"], weights=s["weights"], state=s["state"],
                n_states=optimizer.n_states, early_stopping=s["early_stopping"],
                target_bytes=int(header["target_bytes"]), slots=blas.tile_threads())
    plan = plan_fit(spec, s["batch_size"], s["memory_budget_bytes"])
    task = header["task"]
    if task not in ("classify", "regress"):
        _fail(path, f"unknown task {task!r}")
    classes = arrays.get("classes")
    loss = "squared" if task == "regress" else ("sigmoid" if sizes[-1] == 1 else "softmax")
    tr = Trainer(net, optimizer, loss, plan, int(header["trainer"]["seed"]),
                 bool(header["trainer"]["stochastic"]))
    t = header["trainer"]
    tr.step, tr.epoch = int(t["step"]), int(t["epoch"])
    tr.lr_scale, tr.total_steps = float(t["lr_scale"]), int(t["total_steps"])
    tr.loss_curve = [float(v) for v in t["loss_curve"]]
    tr.validation_scores = [float(v) for v in t["validation_scores"]]
    tr.best_loss = float("inf") if t["best_loss"] is None else float(t["best_loss"])
    tr.best_score = float("-inf") if t["best_score"] is None else float(t["best_score"])
    tr.no_improvement = int(t["no_improvement"])
    if task == "classify" and (classes is None or classes.ndim != 1 or classes.shape[0] < 2):
        _fail(path, "a classifier file needs its classes")
    model.settings_checked = s
    model._adopt(tr, task, classes, int(header["n_features"]), int(header["target_ndim"]),
                 int(header["target_bytes"]))
    if model.n_features != sizes[0]:
        _fail(path, "the feature count does not match the first layer")
    return model
