"""scikit-learn estimators: MLPClassifier and MLPRegressor with scikit-learn's names, on
top of sagd.Model (one trainer for sagd.fit and for these).

scikit-learn is an optional dependency: `pip install "sagd[sklearn]"`.
"""
import numbers
import warnings

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import (_check_sample_weight, check_is_fitted,
                                          column_or_1d, validate_data)
except ImportError as e:        # pragma: no cover - exercised without scikit-learn
    raise ImportError("sagd.MLPClassifier and sagd.MLPRegressor need scikit-learn: "
                      'pip install "sagd[sklearn]"') from e

from .model import Model

# scikit-learn's activation names, and sagd's
_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "sigmoid": "sigmoid",
                "identity": "identity", "gelu": "gelu"}


class _SagdMLP(BaseEstimator):
    """Shared parameters and training of both estimators. Parameters mirror
    sklearn.neural_network.MLP* where the meaning is the same; sagd adds `weights`,
    `rounding` and `memory_budget`. Differences: solver is "adam", "adamw" or "sgd" (no
    lbfgs); alpha is an L2 penalty as in scikit-learn (gradient alpha * W / batch_size);
    learning_rate applies to the "sgd" solver (and "cosine" to any), invscaling counts
    optimizer steps, not samples; the early-stopping split is random, not stratified."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10,
                 weights="bf16", rounding="stochastic", memory_budget="16MB"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.weights = weights
        self.rounding = rounding
        self.memory_budget = memory_budget

    _task = None

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True           # CSR rows are densified batch by batch
        return tags

    # ------------------------------------------------------------------ settings

    def _settings(self, n_samples):
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not valid; choose one of "
                             + ", ".join(repr(a) for a in _ACTIVATIONS))
        if self.batch_size == "auto":
            batch = min(200, n_samples)
        elif (isinstance(self.batch_size, numbers.Integral)
              and not isinstance(self.batch_size, bool) and self.batch_size >= 1):
            batch = int(self.batch_size)
        else:
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got "
                             f"{self.batch_size!r}")
        if not (isinstance(self.alpha, numbers.Real) and self.alpha >= 0):
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        if self.solver == "lbfgs":
            raise ValueError("solver='lbfgs' is not available in sagd (it needs the full "
                             "gradient in memory); choose one of 'adam', 'adamw', 'sgd'")
        if self.learning_rate not in ("constant", "invscaling", "adaptive", "cosine"):
            raise ValueError(f"learning_rate={self.learning_rate!r} is not valid; choose one "
                             "of 'constant', 'invscaling', 'adaptive', 'cosine'")
        schedule = (self.learning_rate if self.solver == "sgd" or self.learning_rate == "cosine"
                    else "constant")
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        if isinstance(self.random_state, numbers.Integral):
            seed = int(self.random_state) % 2**64
        hidden = self.hidden_layer_sizes
        if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
            hidden = (hidden,)
        return dict(
            hidden=tuple(hidden), activation=_ACTIVATIONS[self.activation], task=self._task,
            epochs=self.max_iter, batch_size=batch, optimizer=self.solver,
            lr=self.learning_rate_init, weights=self.weights, rounding=self.rounding,
            memory_budget=self.memory_budget,
            validation_fraction=self.validation_fraction if self.early_stopping else 0.0,
            early_stopping=bool(self.early_stopping), seed=seed, verbose=bool(self.verbose),
            momentum=self.momentum, nesterov=bool(self.nesterovs_momentum), beta1=self.beta_1,
            beta2=self.beta_2, epsilon=self.epsilon, weight_decay=self.alpha / batch,
            schedule=schedule, power_t=self.power_t, tol=self.tol,
            n_iter_no_change=self.n_iter_no_change, shuffle=bool(self.shuffle))

    def _check_X(self, X, reset):
        return validate_data(self, X, reset=reset, accept_sparse="csr", dtype="numeric",
                             ensure_all_finite=False)

    def _check_Xy(self, X, y, reset):
        X, y = validate_data(self, X, y, reset=reset, accept_sparse="csr", dtype="numeric",
                             ensure_all_finite=False, multi_output=True,
                             y_numeric=self._task == "regress")
        return X, self._check_y(y)

    # ------------------------------------------------------------------ training

    def _record(self, model, X, epochs_run, first):
        self.model_ = model
        self.n_iter_ = (0 if first else self.n_iter_) + epochs_run
        self.t_ = (0 if first else self.t_) + epochs_run * X.shape[0]
        self.loss_curve_ = model.loss_curve
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else None
        self.plan_ = model.plan
        self.n_outputs_ = model.n_outputs
        if model.validation_scores:
            self.validation_scores_ = model.validation_scores
            self.best_validation_score_ = max(self.validation_scores_)
        else:
            self.best_loss_ = min(self.loss_curve_) if self.loss_curve_ else None

    def _fit(self, X, y, sample_weight, incremental, classes=None):
        first = not (hasattr(self, "model_") and (incremental or self.warm_start))
        X, y = self._check_Xy(X, y, reset=first)
        w = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        settings = self._settings(X.shape[0])
        if first and not incremental:
            model = Model(**settings)
            model.fit(X, y, sample_weight=w)
        elif first:
            model = Model(**dict(settings, early_stopping=False, validation_fraction=0.0))
            model.train_more(X, y, w, epochs=1, classes=classes)
        else:
            model = self.model_
            if not incremental:      # warm start: max_iter more epochs from here
                model.train_more(X, y, w, epochs=self.max_iter, tol=self.tol)
            else:
                model.train_more(X, y, w, epochs=1)
        epochs_run, stopped = model.last_run
        self._record(model, X, epochs_run, first)
        if not incremental and not stopped and self.tol is not None and epochs_run == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                          "and the optimization hasn't converged yet.", ConvergenceWarning)
        return self

    def fit(self, X, y, sample_weight=None):
        """Train on X, y (max_iter epochs at most; with warm_start, continue)."""
        return self._fit(X, y, sample_weight, incremental=False)

    @property
    def coefs_(self):
        """Weights per layer as fp32 arrays (n_in, n_out), decoded from storage."""
        check_is_fitted(self, "model_")
        return [layer.W.to_float().T for layer in self.model_.network.layers]

    @property
    def intercepts_(self):
        check_is_fitted(self, "model_")
        return [layer.b.to_float() for layer in self.model_.network.layers]

    def predict(self, X):
        check_is_fitted(self, "model_")
        return self.model_.predict(self._check_X(X, reset=False))


class MLPClassifier(ClassifierMixin, _SagdMLP):
    """Multi-layer perceptron classifier trained by sagd under a memory budget.

    Parameters are those of sklearn.neural_network.MLPClassifier (see _SagdMLP for the
    differences) plus weights ("fp32", "bf16", "fp16", "int8"), rounding ("stochastic",
    "nearest") and memory_budget (e.g. "16MB", bytes, or None).

    Attributes: classes_, n_features_in_, feature_names_in_, loss_, loss_curve_, n_iter_,
    t_, n_outputs_, plan_ (the MemoryPlan), validation_scores_ and best_validation_score_
    (early stopping) or best_loss_, coefs_, intercepts_, model_ (the sagd.Model).
    """

    _task = "classify"

    def _check_y(self, y):
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        return y

    def _record(self, model, X, epochs_run, first):
        super()._record(model, X, epochs_run, first)
        self.classes_ = model.classes
        self.out_activation_ = "logistic" if len(self.classes_) == 2 else "softmax"

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One pass over X, y. The first call needs classes= (all labels to expect)."""
        if not hasattr(self, "model_"):
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit.")
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"classes={np.unique(classes).tolist()} is not the same as on "
                             f"the first call: {self.classes_.tolist()}")
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    def predict_proba(self, X):
        """Probability of each class (columns in the order of classes_)."""
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(self._check_X(X, reset=False))

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))


class MLPRegressor(RegressorMixin, _SagdMLP):
    """Multi-layer perceptron regressor trained by sagd under a memory budget (squared
    error; one or several targets). Parameters and attributes as MLPClassifier's, without
    classes."""

    _task = "regress"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def _check_y(self, y):
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return y.astype(np.float64, copy=False)

    def partial_fit(self, X, y, sample_weight=None):
        """One pass over X, y."""
        return self._fit(X, y, sample_weight, incremental=True)
