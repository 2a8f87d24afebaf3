"""The model users hold: sagd.fit, predict, predict_proba, score, partial_fit, save, and
sagd.plan for "will this fit?" before any training."""
import math
import numbers
import warnings

import numpy as np

from . import _kernels, blas
from .budget import Spec, parse_budget, plan_fit, plan_predict
from .data import (as_matrix, as_targets, check_finite, check_labels_known,
                   check_regression_targets, check_sample_weight, find_classes, gather, plain)
from .formats import FORMATS, ROUNDING, STATE_FORMATS, check_choice
from .network import ACTIVATIONS, Network
from .optim import Optimizer
from .trainer import Progress, Trainer

TASKS = ("auto", "classify", "regress")

#: settings of a Model and their defaults (sagd.fit takes the same keywords)
DEFAULTS = dict(
    hidden=(256,), activation="relu", task="auto", epochs=10, batch_size=64,
    optimizer="adam", lr=1e-3, weights="bf16", rounding="stochastic", memory_budget="16MB",
    validation_fraction=0.0, early_stopping=False, seed=0, verbose=False,
    state=None, momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, epsilon=1e-8,
    weight_decay=0.0, schedule="constant", power_t=0.5, tol=None, n_iter_no_change=10,
    shuffle=True,
)


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def check_settings(s):
    """Validate settings; returns a normalised copy. Messages list what is accepted."""
    s = dict(s)
    unknown = set(s) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; valid ones: {sorted(DEFAULTS)}")
    hidden = s["hidden"]
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    try:
        hidden = tuple(hidden)
    except TypeError:
        raise ValueError(f"hidden must be a tuple of layer widths, got {hidden!r}") from None
    for h in hidden:
        _positive_int("every hidden layer width", h)
    s["hidden"] = tuple(int(h) for h in hidden)
    check_choice("activation", s["activation"], ACTIVATIONS)
    check_choice("task", s["task"], TASKS)
    check_choice("weights", s["weights"], FORMATS)
    check_choice("rounding", s["rounding"], ROUNDING)
    if s["state"] is None:
        s["state"] = "fp32" if s["weights"] == "fp32" else "bf16"
    check_choice("state", s["state"], STATE_FORMATS)
    s["epochs"] = _positive_int("epochs", s["epochs"])
    s["batch_size"] = _positive_int("batch_size", s["batch_size"])
    s["n_iter_no_change"] = _positive_int("n_iter_no_change", s["n_iter_no_change"])
    vf = s["validation_fraction"]
    if not (isinstance(vf, numbers.Real) and 0 <= vf < 1):
        raise ValueError(f"validation_fraction must be in [0, 1), got {vf!r}")
    if s["early_stopping"] and vf == 0:
        raise ValueError("early_stopping needs a validation set: set validation_fraction "
                         "(e.g. 0.1)")
    if s["tol"] is not None and not (isinstance(s["tol"], numbers.Real) and s["tol"] >= 0):
        raise ValueError(f"tol must be None or a number >= 0, got {s['tol']!r}")
    seed = s["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    s["memory_budget_bytes"] = parse_budget(s["memory_budget"])
    Optimizer(**_optimizer_kw(s))       # validates the optimizer's settings
    return s


def _optimizer_kw(s):
    return dict(name=s["optimizer"], lr=s["lr"], momentum=s["momentum"],
                nesterov=s["nesterov"], beta1=s["beta1"], beta2=s["beta2"],
                eps=s["epsilon"], weight_decay=s["weight_decay"], schedule=s["schedule"],
                power_t=s["power_t"])


def _target_bytes(y):
    return int(y.dtype.itemsize * (y.shape[1] if y.ndim == 2 else 1)) if y.dtype != object else 64


class Model:
    """A network trained by sagd, with what it needs to keep learning and predicting.

    Create it with sagd.fit(X, y, ...) or Model(**settings).fit(X, y). Attributes after
    fitting: task ("classify" / "regress"), classes (labels, classification),
    n_features, plan (the MemoryPlan used), loss_curve, validation_scores, epoch and
    step (training position).
    """

    def __init__(self, **settings):
        self.settings = {**DEFAULTS, **settings}
        self.trainer = None
        self.task = None
        self.classes = None
        self.n_features = None
        self.n_outputs = None
        self.target_ndim = 1       # regression: 2 when fitted on a 2-D y
        self.predict_plan = None
        self.last_run = (0, False)  # epochs the last fit/train_more ran, and if it stopped early

    # ------------------------------------------------------------------ state

    @property
    def fitted(self):
        return self.trainer is not None

    @property
    def network(self):
        return self.trainer.network

    @property
    def plan(self):
        """The MemoryPlan of training (None before fitting)."""
        return self.trainer.plan if self.trainer else None

    @property
    def loss_curve(self):
        return list(self.trainer.loss_curve) if self.trainer else []

    @property
    def validation_scores(self):
        return list(self.trainer.validation_scores) if self.trainer else []

    @property
    def epoch(self):
        return self.trainer.epoch if self.trainer else 0

    @property
    def step(self):
        return self.trainer.step if self.trainer else 0

    def __repr__(self):
        s = self.settings
        state = (f"fitted, {self.task}, {' -> '.join(map(str, self.network.sizes))}"
                 if self.fitted else "not fitted")
        return f"<sagd.Model {state}, weights={s['weights']!r}, optimizer={s['optimizer']!r}>"

    def _need_fitted(self):
        if not self.fitted:
            raise RuntimeError("this model is not fitted yet; call fit(X, y) first")

    # ------------------------------------------------------------------ training

    def fit(self, X, y, sample_weight=None):
        """Train from scratch on X, y for the configured epochs. Returns self."""
        s = check_settings(self.settings)
        X, y, w = self._check_data(X, y, sample_weight)
        task = self._resolve_task(y, s["task"])
        trainer, classes = self._build(X, y, task, s, classes=None)
        n = X.shape[0]
        n_val = math.ceil(s["validation_fraction"] * n) if s["validation_fraction"] else 0
        if n_val and (n_val < 2 or n - n_val < 1):
            raise ValueError(
                f"validation_fraction={s['validation_fraction']} of {n} samples leaves "
                f"{n_val} validation and {n - n_val} training samples; validation needs at "
                "least 2 and training at least 1. Use more data or a larger "
                "validation_fraction (or none).")
        self._validate(X, y, trainer, task, classes)
        # everything is checked: only now does the model change
        self._adopt(trainer, task, classes, X.shape[1], y.ndim, _target_bytes(y))
        trainer.total_steps = s["epochs"] * math.ceil((n - n_val) / s["batch_size"])
        self._train(X, y, w, n - n_val, s["epochs"], s)
        return self

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One more pass over X, y, keeping the weights, optimizer state and training
        position. On a model that is not fitted yet it starts one (classes= declares
        every label the model will see; by default those of this y)."""
        return self.train_more(X, y, sample_weight, epochs=1, classes=classes)

    def train_more(self, X, y, sample_weight=None, epochs=1, classes=None, tol=None):
        """`epochs` more passes over X, y from where training stopped (the weights,
        optimizer state, step and schedule carry on); with tol, stop early when the loss
        stops improving as in fit. Returns self."""
        if not self.fitted:
            s = check_settings(self.settings)
            X, y, w = self._check_data(X, y, sample_weight)
            task = self._resolve_task(y, s["task"])
            if classes is not None and task == "regress":
                raise ValueError("classes= applies to classification only")
            trainer, classes = self._build(X, y, task, s, classes=classes)
            self._validate(X, y, trainer, task, classes)
            self._adopt(trainer, task, classes, X.shape[1], y.ndim, _target_bytes(y))
            trainer.total_steps = epochs * math.ceil(X.shape[0] / s["batch_size"])
        else:
            X, y, w = self._check_data(X, y, sample_weight)
            if classes is not None and self.classes is not None:
                declared = np.unique(np.asarray(classes))
                if not np.array_equal(declared, self.classes):
                    raise ValueError(f"classes={declared.tolist()} differ from the classes the "
                                     f"model was started with: {self.classes.tolist()}")
            self.trainer.allocate(early_stopping=False)
            try:
                self._validate(X, y, self.trainer, self.task, self.classes)
            except Exception:
                self.trainer.release()
                raise
        s = self.settings_checked
        self._train(X, y, w, X.shape[0], _positive_int("epochs", epochs),
                    dict(s, early_stopping=False, tol=tol, validation_fraction=0.0))
        return self

    def _check_data(self, X, y, sample_weight):
        X = as_matrix(X)
        if self.fitted and X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} features, but the model was fitted with "
                             f"{self.n_features}")
        y = as_targets(y, X.shape[0])
        if y.ndim == 2 and y.shape[1] == 1 and (self.task == "classify" or
                                                y.dtype.kind not in "fc"):
            y = y[:, 0]
        w = check_sample_weight(sample_weight, X.shape[0])
        return X, y, w

    def _resolve_task(self, y, task):
        if self.fitted:
            return self.task
        if task == "auto":
            task = "regress" if y.dtype.kind in "fc" else "classify"
            if task == "regress" and y.ndim == 1 and y.shape[0] >= 20:
                head = y[:1000]
                if np.all(np.isfinite(head)) and np.all(head == np.round(head)) \
                        and np.unique(head).shape[0] <= 10:
                    warnings.warn(
                        f"y is float with only {np.unique(head).shape[0]} whole values in its "
                        "first rows: training a regressor (float y means regression). Pass "
                        "task='classify', or integer labels, to train a classifier.",
                        UserWarning, stacklevel=4)
        if task == "classify" and y.ndim != 1:
            raise ValueError(f"classification needs 1-D labels, got y of shape {y.shape} "
                             "(several label columns are not supported)")
        return task

    def _build(self, X, y, task, s, classes):
        """The trainer for this data, with its memory plan; allocates what the plan
        counted. Nothing is attached to the model yet."""
        chunk = 4096
        if task == "classify":
            if classes is None:
                classes = find_classes(y, chunk)
            else:
                classes = np.unique(np.asarray(classes))
            if classes.shape[0] < 2:
                c = plain(classes[0]) if classes.shape[0] else None
                raise ValueError(f"y has only one class, {c!r} (dtype {y.dtype}); a "
                                 "classifier needs at least 2")
            n_out = 1 if classes.shape[0] == 2 else classes.shape[0]
            loss = "sigmoid" if n_out == 1 else "softmax"
        else:
            if y.dtype.kind not in "biuf":
                raise ValueError(f"regression targets must be numbers, got dtype {y.dtype}")
            classes = None
            n_out = 1 if y.ndim == 1 else y.shape[1]
            loss = "squared"
        optimizer = Optimizer(**_optimizer_kw(s))
        spec = Spec(sizes=(X.shape[1],) + s["hidden"] + (n_out,), activation=s["activation"],
                    weights=s["weights"], state=s["state"], n_states=optimizer.n_states,
                    early_stopping=s["early_stopping"], target_bytes=_target_bytes(y),
                    slots=blas.tile_threads())
        plan = plan_fit(spec, s["batch_size"], s["memory_budget_bytes"])
        net = Network(spec.sizes, s["activation"], s["weights"])
        net.add_states(optimizer.n_states, s["state"])
        trainer = Trainer(net, optimizer, loss, plan, s["seed"], s["rounding"] == "stochastic")
        trainer.allocate(s["early_stopping"])
        net.initialize(trainer.seed, trainer.stochastic, trainer.buf.scratch)
        self.settings_checked = s
        return trainer, classes

    def _validate(self, X, y, trainer, task, classes):
        """Check the data before any weight changes, chunk by chunk through the buffers."""
        check_finite(X, trainer.buf.x)
        if task == "classify":
            check_labels_known(y, classes, trainer.plan.micro_batch, trainer.buf.y)
        else:
            check_regression_targets(y, trainer.plan.micro_batch)

    def _adopt(self, trainer, task, classes, n_features, target_ndim, target_bytes):
        self.trainer = trainer
        self.target_ndim = target_ndim
        self.target_bytes = target_bytes
        self.task = task
        self.classes = classes
        self.n_features = n_features
        self.n_outputs = trainer.network.sizes[-1]

    def _train(self, X, y, w, n_train, epochs, s):
        """Run up to `epochs` epochs; returns (epochs run, whether a stopping rule ended
        training before that)."""
        trainer = self.trainer
        n = X.shape[0]
        split = n_train < n
        progress = Progress(epochs) if s["verbose"] else None
        done, stopped = 0, False
        try:
            with blas.single_threaded():
                done, stopped = self._epochs(X, y, w, n_train, n, epochs, s, split, progress)
            if s["early_stopping"]:
                trainer.restore_best()
        finally:
            if progress:
                progress.close()
            trainer.release()
            trainer.best_copy = None
        self.last_run = (done, stopped)
        return done, stopped

    def _epochs(self, X, y, w, n_train, n, epochs, s, split, progress):
        trainer = self.trainer
        done, stopped = 0, False
        for e in range(epochs):
            if progress:
                progress.start_epoch(e + 1)
            loss = trainer.run_epoch(X, y, w, self.classes, n_train, s["shuffle"], progress)
            done += 1
            val = (trainer.score(X, y, self.classes, range(n_train, n), n, split)
                   if split else None)
            if progress:
                progress.end_epoch(loss, val, n_train)
            if trainer.end_of_epoch(loss, val, s["tol"], s["n_iter_no_change"],
                                    s["early_stopping"]):
                stopped = True
                break
        return done, stopped

    # ------------------------------------------------------------------ prediction

    def _predict_plan(self, X, out_bytes_per_row):
        """X checked, and the plan for predicting it within the budget (the result takes
        out_bytes_per_row bytes per row)."""
        self._need_fitted()
        X = as_matrix(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} features, but the model was fitted with "
                             f"{self.n_features}")
        s = self.settings_checked
        net = self.network
        spec = Spec(sizes=net.sizes, activation=net.activation, weights=net.weights,
                    slots=blas.tile_threads())
        plan = plan_predict(spec, X.shape[0], out_bytes_per_row, s["memory_budget_bytes"])
        self.predict_plan = plan
        return X, plan

    def _logits(self, X, out, out_bytes_per_row, convert):
        """Run the network over X in planned chunks; convert(start, logits) fills out."""
        X, plan = self._predict_plan(X, out_bytes_per_row)
        buf = self.network.allocate(plan.micro_batch, plan.tile_rows, training=False,
                                    slots=plan.threads)
        idx = np.empty(plan.micro_batch, np.int64)
        with blas.single_threaded():
            self._predict_chunks(X, plan, buf, idx, convert)
        return out

    def _predict_chunks(self, X, plan, buf, idx, convert):
        n, chunk = X.shape[0], plan.micro_batch
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            idx[:m] = np.arange(start, start + m)
            gather(X, idx[:m], buf.x)
            # a short last chunk is padded with zero rows: every chunk has the same shape, so
            # a row's prediction never depends on which rows come with it
            buf.x[m:] = 0
            hit = _kernels.first_nonfinite(buf.x[:m])
            if hit is not None:
                v = buf.x[hit]
                what = "NaN" if np.isnan(v) else "inf (or a value too large for float32)"
                raise ValueError(f"X contains {what} at row {start + hit[0]}, column "
                                 f"{hit[1]}; sagd needs finite values")
            logits, overflow = self.network.forward_predict(buf, chunk)
            logits = logits[:m]
            if overflow or not np.all(np.isfinite(logits)):
                raise FloatingPointError(
                    f"the network's output overflowed for rows {start}..{start + m - 1}; "
                    "scale the input the way the training data was scaled")
            convert(start, logits)

    def predict_proba(self, X):
        """Class probabilities, one column per class (in the order of classes)."""
        self._need_fitted()
        if self.task != "classify":
            raise AttributeError("predict_proba is for classification models")
        X = as_matrix(X)
        k = self.classes.shape[0]
        out = np.empty((X.shape[0], k), np.float64)

        def convert(start, logits):
            m = logits.shape[0]
            if k == 2:
                p = logits[:, 0].copy()
                _kernels.sigmoid(p)
                out[start:start + m, 1] = p
                out[start:start + m, 0] = 1.0 - out[start:start + m, 1]
            else:
                _kernels.softmax(logits)
                block = out[start:start + m]
                block[...] = logits
                block /= block.sum(axis=1, keepdims=True)

        return self._logits(X, out, 8 * k, convert)

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """Labels (classification) or target values (regression)."""
        self._need_fitted()
        X = as_matrix(X)
        n = X.shape[0]
        if self.task == "classify":
            classes = self.classes
            out = np.empty(n, dtype=classes.dtype)

            def convert(start, logits):
                m = logits.shape[0]
                pick = (logits[:, 0] > 0).astype(np.intp) if classes.shape[0] == 2 \
                    else logits.argmax(axis=1)
                out[start:start + m] = classes[pick]

            return self._logits(X, out, classes.dtype.itemsize, convert)
        k = self.n_outputs
        out = np.empty((n, k) if self.target_ndim == 2 else n, np.float64)

        def convert(start, logits):
            m = logits.shape[0]
            out[start:start + m] = logits if out.ndim == 2 else logits[:, 0]

        return self._logits(X, out, 8 * k, convert)

    def score(self, X, y, sample_weight=None):
        """Accuracy (classification) or R^2 (regression, averaged over outputs)."""
        self._need_fitted()
        pred = self.predict(X)
        y = as_targets(y, pred.shape[0])
        w = check_sample_weight(sample_weight, pred.shape[0])
        if self.task == "classify":
            y = y.ravel() if y.ndim == 2 and y.shape[1] == 1 else y
            return float(np.average(pred == y, weights=w))
        y = y.astype(np.float64).reshape(pred.shape)
        mean = np.average(y, axis=0, weights=w)
        ss_res = np.average((y - pred) ** 2, axis=0, weights=w)
        ss_tot = np.average((y - mean) ** 2, axis=0, weights=w)
        r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1),
                      np.where(ss_res == 0, 1.0, 0.0))
        return float(np.mean(r2))

    # ------------------------------------------------------------------ files

    def __getstate__(self):
        # pickles carry the model file's bytes: the same checked, portable format
        if not self.fitted:
            return {"settings": self.settings}
        from .files import to_bytes
        return {"file": to_bytes(self)}

    def __setstate__(self, state):
        if "file" in state:
            from .files import from_bytes
            self.__dict__.update(from_bytes(state["file"]).__dict__)
        else:
            self.__init__(**state["settings"])

    def save(self, path):
        """Write the model to one portable file (atomically: a failed save leaves any
        previous file intact)."""
        from .files import save
        self._need_fitted()
        save(self, path)


def fit(X, y, sample_weight=None, **settings):
    """Train a network on X, y within a memory budget and return the Model.

    Settings (defaults): hidden=(256,), activation="relu" (tanh, sigmoid, gelu, identity),
    task="auto" (float y: regress; ints, strings, bools: classify), epochs=10,
    batch_size=64, optimizer="adam" (sgd, adamw), lr=1e-3, weights="bf16" (fp32, fp16,
    int8), rounding="stochastic" (nearest), memory_budget="16MB" (None: unbounded),
    validation_fraction=0.0, early_stopping=False, seed=0, verbose=False; and
    state (optimizer state format, fp32 or bf16), momentum=0.9, nesterov=False,
    beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.0, schedule="constant"
    (cosine, invscaling, adaptive, or a callable step -> lr), power_t=0.5,
    tol=None (a number: stop when the loss stops improving), n_iter_no_change=10,
    shuffle=True.
    """
    model = Model(**settings)
    return model.fit(X, y, sample_weight=sample_weight)


def plan(n_features, hidden, n_outputs, batch_size=64, weights="bf16", optimizer="adam",
         memory_budget=None, activation="relu", state=None, momentum=0.9,
         early_stopping=False):
    """The MemoryPlan of training such a network, without training: will it fit?
    n_outputs is the output width: classes for multiclass, 1 for binary, targets for
    regression. Raises MemoryBudgetError when memory_budget is too small."""
    s = check_settings(dict(DEFAULTS, hidden=hidden, batch_size=batch_size, weights=weights,
                            optimizer=optimizer, memory_budget=memory_budget,
                            activation=activation, state=state, momentum=momentum,
                            early_stopping=early_stopping,
                            validation_fraction=0.1 if early_stopping else 0.0))
    _positive_int("n_features", n_features)
    _positive_int("n_outputs", n_outputs)
    opt = Optimizer(**_optimizer_kw(s))
    spec = Spec(sizes=(int(n_features),) + s["hidden"] + (int(n_outputs),),
                activation=s["activation"], weights=s["weights"], state=s["state"],
                n_states=opt.n_states, early_stopping=early_stopping,
                slots=blas.tile_threads())
    return plan_fit(spec, s["batch_size"], s["memory_budget_bytes"])
