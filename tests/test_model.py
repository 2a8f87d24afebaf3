"""sagd.fit and the Model: tasks, labels, predictions, partial_fit, reproducibility."""
import numpy as np
import pytest

import sagd
from sagd.datasets import load_digits

X, Y = load_digits()
Xs, Ys = X[:300], Y[:300]


def quick(X=Xs, y=Ys, **kw):
    return sagd.fit(X, y, **{"hidden": (32,), "epochs": 3, "seed": 0, **kw})


def test_fit_returns_a_model_that_predicts_the_labels():
    m = quick()
    assert m.task == "classify"
    assert m.classes.tolist() == list(range(10))
    pred = m.predict(Xs)
    assert pred.dtype == Ys.dtype and pred.shape == (300,)
    proba = m.predict_proba(Xs)
    assert proba.shape == (300, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert np.array_equal(pred, m.classes[proba.argmax(axis=1)])
    assert 0 <= m.score(Xs, Ys) <= 1
    assert len(m.loss_curve) == 3 and m.epoch == 3


def test_a_rows_prediction_does_not_depend_on_the_other_rows():
    m = quick(y=(Xs @ np.arange(64.0)), epochs=2)
    whole = m.predict(Xs)
    assert np.array_equal(m.predict(Xs[:10]), whole[:10])
    assert np.array_equal(m.predict(Xs[7:8]), whole[7:8])
    assert np.array_equal(m.predict(Xs[::-1]), whole[::-1])


def test_string_labels_and_binary_problems():
    names = np.array(["even", "odd"])[Ys % 2]
    m = quick(y=names)
    assert m.classes.tolist() == ["even", "odd"]
    assert m.network.sizes[-1] == 1          # binary: one sigmoid output
    assert set(m.predict(Xs)) <= {"even", "odd"}
    p = m.predict_proba(Xs)
    assert p.shape == (300, 2) and np.allclose(p.sum(axis=1), 1)
    assert np.array_equal(m.predict(Xs), m.classes[(p[:, 1] > 0.5).astype(int)])


def test_bool_and_object_labels():
    assert quick(y=Ys > 4).classes.tolist() == [False, True]
    obj = np.array([f"d{v}" for v in Ys], dtype=object)
    assert quick(y=obj).classes.tolist() == [f"d{v}" for v in range(10)]


def test_float_targets_regress_and_multi_output_works():
    rng = np.random.default_rng(0)
    y1 = Xs @ rng.standard_normal(64)
    m = quick(y=y1, epochs=20, lr=1e-2)
    assert m.task == "regress" and m.predict(Xs).shape == (300,)
    y2 = np.stack([y1, -2 * y1], axis=1)
    m2 = quick(y=y2, epochs=20, lr=1e-2)
    assert m2.predict(Xs).shape == (300, 2)
    assert m2.score(Xs, y2) > 0.5
    with pytest.raises(AttributeError, match="classification"):
        m2.predict_proba(Xs)


def test_float_labels_regress_with_a_warning():
    with pytest.warns(UserWarning, match="float y means regression"):
        m = quick(y=(Ys % 2).astype(float))
    assert m.task == "regress"


def test_threads_follow_the_environment():
    import subprocess
    import sys
    code = "import sagd; print(sagd.get_num_threads())"
    for env, want in (({"OMP_NUM_THREADS": "1"}, "1"), ({"SAGD_NUM_THREADS": "3"}, "3")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, **env}, check=True)
        assert out.stdout.strip() == want


def test_task_can_be_forced():
    m = quick(y=Ys.astype(np.float64), task="classify")
    assert m.task == "classify" and m.classes.dtype == np.float64


def test_same_seed_same_bits_and_other_seed_other_bits():
    a, b, c = quick(seed=5), quick(seed=5), quick(seed=6)
    for la, lb, lc in zip(a.network.layers, b.network.layers, c.network.layers):
        assert np.array_equal(la.W.codes, lb.W.codes)
        assert not np.array_equal(la.W.codes, lc.W.codes)


def test_partial_fit_keeps_learning_and_counts_steps():
    m = sagd.Model(hidden=(32,), seed=1, lr=3e-3)
    m.partial_fit(Xs[:150], Ys[:150], classes=np.arange(10))
    steps = m.step
    before = m.score(Xs, Ys)
    for _ in range(5):
        m.partial_fit(Xs[150:], Ys[150:])
    assert m.step == steps + 5 * 3 and m.epoch == 6
    assert m.score(Xs, Ys) > before


def test_partial_fit_declared_class_absent_from_the_first_batch():
    m = sagd.Model(hidden=(16,), seed=2)
    first = Ys < 9
    m.partial_fit(Xs[first], Ys[first], classes=np.arange(10))
    assert m.predict_proba(Xs[:5]).shape == (5, 10)
    m.partial_fit(Xs[~first], Ys[~first])          # class 9 arrives later
    with pytest.raises(ValueError, match="label 11"):
        m.partial_fit(Xs[:5], np.array([1, 2, 11, 3, 4]))


def test_failed_calls_leave_the_model_unchanged():
    m = quick()
    codes = [layer.W.codes.copy() for layer in m.network.layers]
    step = m.step
    bad = Xs[:20].copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7, column 3"):
        m.partial_fit(bad, Ys[:20])
    with pytest.raises(ValueError, match="label 42"):
        m.partial_fit(Xs[:20], np.r_[Ys[:19], 42])
    with pytest.raises(ValueError, match="X has 63 features, but the model was fitted with 64"):
        m.partial_fit(Xs[:20, :63], Ys[:20])
    assert m.step == step
    for layer, c in zip(m.network.layers, codes):
        assert np.array_equal(layer.W.codes, c)


def test_validation_and_early_stopping_restore_the_best_weights():
    m = sagd.fit(X, Y, hidden=(32,), epochs=40, validation_fraction=0.2,
                 early_stopping=True, n_iter_no_change=2, tol=0.0, seed=3, lr=1e-2)
    assert len(m.validation_scores) < 40                  # it stopped early
    assert max(m.validation_scores) > 0.9


def test_too_small_validation_split_is_a_clear_error():
    with pytest.raises(ValueError, match="leaves 1 validation"):
        sagd.fit(Xs[:10], Ys[:10], validation_fraction=0.1, early_stopping=True)


def test_verbose_progress(capsys):
    """One line per epoch in a file or pipe (a terminal gets one updating line)."""
    quick(verbose=True, epochs=2)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and "\r" not in err
    assert lines[1].startswith("sagd: epoch 2/2") and "loss" in err and "samples/s" in err


def test_verbose_progress_on_a_terminal():
    import io

    from sagd.trainer import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    out = Terminal()
    p = Progress(2, out)
    for e in (1, 2):
        p.start_epoch(e)
        p.batch(50, 100, 0.5)
        p.end_epoch(0.4, 0.9, 100)
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") >= 2 and "val 0.9000" in text


def test_learning_rate_schedules_give_the_documented_rates():
    from sagd.optim import Optimizer
    cos = Optimizer(lr=0.1, schedule="cosine")
    assert cos.lr_at(1, 100) == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi / 100)))
    assert cos.lr_at(50, 100) == pytest.approx(0.05)
    assert cos.lr_at(100, 100) == pytest.approx(0.0)
    inv = Optimizer(lr=0.1, schedule="invscaling", power_t=0.5)
    assert inv.lr_at(4, 100) == pytest.approx(0.05)
    assert Optimizer(lr=0.1, schedule=lambda t: 1.0 / t).lr_at(8, 1) == 0.125
    with pytest.raises(ValueError, match="schedule returned"):
        Optimizer(schedule=lambda t: float("nan")).lr_at(1, 1)


@pytest.mark.parametrize("schedule", ["cosine", "invscaling", "adaptive",
                                      lambda step: 1e-2 / (1 + step / 100)])
def test_training_with_each_schedule_learns(schedule):
    m = quick(schedule=schedule, epochs=10, lr=1e-2, batch_size=32)
    assert m.score(Xs, Ys) > 0.7


def test_optimizers_learn():
    for opt in ("sgd", "adam", "adamw"):
        m = quick(optimizer=opt, lr=0.05 if opt == "sgd" else 3e-3, epochs=8, weight_decay=1e-4)
        assert m.score(Xs, Ys) > 0.8, opt


def test_overflowing_inputs_stop_with_finite_weights():
    big = Xs * 1e30
    with pytest.raises(sagd.TrainingDivergedError, match="Scale the input"):
        sagd.fit(big, Ys, hidden=(16,), epochs=1, weights="fp32")


def test_unknown_settings_are_rejected_with_the_valid_values():
    with pytest.raises(ValueError, match="'fp32', 'bf16', 'fp16', 'int8'"):
        quick(weights="fp8")
    with pytest.raises(ValueError, match="'sgd', 'adam', 'adamw'"):
        quick(optimizer="lbfgs")
    with pytest.raises(ValueError, match="hidden layer width"):
        quick(hidden=(0,))
    with pytest.raises(TypeError, match="unknown setting"):
        quick(hiden=(3,))
