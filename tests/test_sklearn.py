"""scikit-learn compatibility: the conformance suite, pipelines, grid search,
cross-validation and pickling."""
import pickle

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import sagd  # noqa: E402
from sagd import MLPClassifier, MLPRegressor  # noqa: E402
from sagd.datasets import load_digits  # noqa: E402

X, Y = load_digits()

WEIGHTED_REPEAT = ("minibatch training with stochastic rounding: weighting a sample by k "
                   "equals repeating it k times only in expectation (other batches, other "
                   "rounding), as for any stochastic-gradient estimator")


def expected_failures(estimator):
    return {"check_sample_weight_equivalence_on_dense_data": WEIGHTED_REPEAT,
            "check_sample_weight_equivalence_on_sparse_data": WEIGHTED_REPEAT}


# scikit-learn itself skips its array-API checks unless SCIPY_ARRAY_API=1 is set; no check
# is skipped by sagd.
@parametrize_with_checks([MLPClassifier(hidden_layer_sizes=(16,), random_state=0),
                          MLPRegressor(hidden_layer_sizes=(16,), random_state=0)],
                         expected_failed_checks=expected_failures)
def test_scikit_learn_conformance(estimator, check):
    check(estimator)


def test_pipeline_grid_search_with_two_jobs_and_cross_validation():
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=30,
                                                         batch_size=32, random_state=0))
    scores = cross_val_score(pipe, X[:600], Y[:600], cv=3)
    assert scores.mean() > 0.8          # scikit-learn's own MLP: 0.85 with these settings
    grid = GridSearchCV(pipe, {"mlpclassifier__weights": ["bf16", "int8"],
                               "mlpclassifier__learning_rate_init": [1e-3, 3e-3]},
                        cv=2, n_jobs=2)
    grid.fit(X[:600], Y[:600])
    assert grid.best_score_ > 0.8
    assert set(grid.best_params_) == {"mlpclassifier__weights",
                                      "mlpclassifier__learning_rate_init"}


def test_pickle_round_trip_and_clone():
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=20, random_state=1,
                        weights="int8").fit(X[:500], Y[:500])
    back = pickle.loads(pickle.dumps(clf))
    assert np.array_equal(back.predict(X), clf.predict(X))
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    c = clone(clf)
    assert c.get_params() == clf.get_params() and not hasattr(c, "model_")


def test_learned_attributes_follow_the_conventions():
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0,
                        memory_budget="1MB").fit(X[:300], Y[:300])
    assert clf.classes_.tolist() == list(range(10))
    assert clf.n_features_in_ == 64 and clf.n_iter_ == 5 and len(clf.loss_curve_) == 5
    assert isinstance(clf.plan_, sagd.MemoryPlan) and clf.plan_.budget == 2**20
    assert [c.shape for c in clf.coefs_] == [(64, 16), (16, 10)]
    assert clf.t_ == 5 * 300


def test_warm_start_continues_and_partial_fit_accumulates():
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0, warm_start=True,
                        tol=None)
    clf.fit(X[:400], Y[:400])
    first = [c.copy() for c in clf.coefs_]
    clf.fit(X[:400], Y[:400])
    assert clf.n_iter_ == 6 and not np.array_equal(first[0], clf.coefs_[0])
    reg = MLPRegressor(hidden_layer_sizes=(8,), random_state=0)
    for _ in range(3):
        reg.partial_fit(X[:200], Y[:200].astype(float))
    assert reg.n_iter_ == 3 and reg.model_.epoch == 3


def test_accuracy_close_to_scikit_learn_on_digits_and_breast_cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier as SkMLP
    for name, (Xd, yd) in {"digits": (X, Y),
                           "breast cancer": load_breast_cancer(return_X_y=True)}.items():
        Xtr, Xte, ytr, yte = train_test_split(Xd, yd, test_size=0.3, random_state=0,
                                              stratify=yd)
        kw = dict(hidden_layer_sizes=(100,), max_iter=200, random_state=0)
        ours = make_pipeline(StandardScaler(), MLPClassifier(**kw)).fit(Xtr, ytr)
        theirs = make_pipeline(StandardScaler(), SkMLP(**kw)).fit(Xtr, ytr)
        a, b = ours.score(Xte, yte), theirs.score(Xte, yte)
        assert a >= b - 0.01, f"{name}: sagd {a:.4f}, scikit-learn {b:.4f}"
