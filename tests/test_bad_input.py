"""Every kind of bad input gets a clear error that names the problem (or a documented
correct result), never a crash deep inside, a hang, NaN weights, or a changed model."""
import numpy as np
import pytest

import sagd
from sagd.datasets import load_digits

X, Y = load_digits()
X, Y = X[:300], Y[:300]
FAST = dict(hidden=(16,), epochs=2, seed=0)


def weights_of(model):
    return [t.codes.copy() for layer in model.network.layers for t in layer.tensors().values()]


def same_weights(model, before):
    return all(np.array_equal(a, b) for a, b in zip(weights_of(model), before))


# ---------------------------------------------------------------------- values


@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_X_names_row_and_column(value, word):
    bad = X.copy()
    bad[41, 7] = value
    with pytest.raises(ValueError, match=f"contains {word} at row 41, column 7"):
        sagd.fit(bad, Y, **FAST)
    model = sagd.fit(X, Y, **FAST)
    with pytest.raises(ValueError, match=f"row 41, column 7"):
        model.predict(bad)


def test_values_too_large_for_float32_are_named():
    bad = X.astype(np.float64)
    bad[3, 2] = 1e300
    with pytest.raises(ValueError, match=r"X\[3, 2\] = 1e\+300 is too large for float32"):
        sagd.fit(bad, Y, **FAST)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_y(value):
    y = Y.astype(np.float64)
    y[5] = value
    with pytest.raises(ValueError, match="row 5"):
        sagd.fit(X, y, **FAST)                          # regression targets
    with pytest.raises(ValueError, match="row 5"):
        sagd.fit(X, y, task="classify", **FAST)         # float labels


def test_overflow_during_training_keeps_the_last_finite_weights():
    model = sagd.fit(X, Y, **FAST)
    before, step = weights_of(model), model.step
    # so large that the first forward pass overflows: nothing is updated
    with pytest.raises(sagd.TrainingDivergedError, match="Scale the input"):
        model.partial_fit(X * 1e38, Y)
    assert same_weights(model, before) and model.step == step
    # a learning rate so large that updates overflow: caught after the step (or at the next
    # forward pass), and elements that would have become inf keep their last finite values
    wild = sagd.Model(hidden=(16,), epochs=3, optimizer="sgd", momentum=0.0, lr=1e38)
    with pytest.raises(sagd.TrainingDivergedError, match="lower the learning rate"):
        wild.fit(X, Y)
    for layer in wild.network.layers:
        for t in layer.tensors().values():
            assert np.all(np.isfinite(t.to_float()))


# ---------------------------------------------------------------------- shapes


def test_shapes():
    with pytest.raises(ValueError, match="must be 2-D .* got 1-D .*reshape"):
        sagd.fit(X[:, 0], Y, **FAST)
    with pytest.raises(ValueError, match="empty"):
        sagd.fit(np.zeros((0, 64)), Y[:0], **FAST)
    with pytest.raises(ValueError, match="empty"):
        sagd.fit(np.zeros((10, 0)), Y[:10], **FAST)
    with pytest.raises(ValueError, match="X has 300 samples but y has 299"):
        sagd.fit(X, Y[:-1], **FAST)
    model = sagd.fit(X, Y, **FAST)
    for call in (model.predict, model.predict_proba, lambda x: model.partial_fit(x, Y)):
        with pytest.raises(ValueError, match="X has 63 features, but the model was fitted "
                                             "with 64"):
            call(X[:, :63])


def test_one_class_names_the_value_and_dtype():
    with pytest.raises(ValueError, match=r"only one class, 7 \(dtype int64\)"):
        sagd.fit(X, np.full(300, 7), **FAST)
    with pytest.raises(ValueError, match=r"only one class, 'cat' \(dtype <U3\)"):
        sagd.fit(X, np.full(300, "cat"), **FAST)


# ---------------------------------------------------------------------- labels


def test_label_kinds():
    strings = np.array(["ant", "bee", "cow"])[Y % 3]
    assert sagd.fit(X, strings, **FAST).predict(X[:3]).dtype.kind == "U"
    assert sagd.fit(X, Y % 2 == 0, **FAST).classes.tolist() == [False, True]
    mixed_ints = np.array([np.int8(v) if i % 2 else int(v) for i, v in enumerate(Y % 3)],
                          dtype=object)
    assert sagd.fit(X, mixed_ints, **FAST).classes.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="mixes label types"):
        sagd.fit(X, np.array([1, "a"] * 150, dtype=object), **FAST)
    with pytest.raises(ValueError, match="missing label"):
        sagd.fit(X, np.array([1, None] * 150, dtype=object), **FAST)


def test_label_outside_declared_classes_is_named_not_mapped():
    model = sagd.Model(hidden=(16,))
    with pytest.raises(ValueError, match=r"label 10, which is not one of the classes"):
        model.partial_fit(X, np.r_[Y[:-1], 10], classes=np.arange(10))
    assert not model.fitted
    model.partial_fit(X, Y, classes=np.arange(10))
    with pytest.raises(ValueError, match="label -1"):
        model.partial_fit(X[:3], np.array([1, -1, 2]))


def test_early_stopping_with_too_few_validation_samples():
    with pytest.raises(ValueError, match="leaves 1 validation"):
        sagd.fit(X[:12], Y[:12], validation_fraction=0.05, early_stopping=True)
    with pytest.raises(ValueError, match="needs a validation set"):
        sagd.fit(X, Y, early_stopping=True)


# ---------------------------------------------------------------------- dtypes, layouts


def test_layouts_give_identical_models(tmp_path):
    Xf = np.asarray(X, np.float32)
    mm_path = tmp_path / "x.f32"
    mm = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=Xf.shape)
    mm[:] = Xf
    mm.flush()
    wide = np.zeros((300, 128), np.float32)
    wide[:, ::2] = Xf
    pd = pytest.importorskip("pandas")
    variants = {
        "C float32": Xf,
        "F order": np.asfortranarray(Xf),
        "strided view": wide[:, ::2],
        "reversed rows": Xf[::-1][::-1],
        "float64": Xf.astype(np.float64),
        "read-only memmap": np.memmap(mm_path, dtype=np.float32, mode="r", shape=Xf.shape),
        "DataFrame": pd.DataFrame(Xf, columns=[f"c{i}" for i in range(64)]),
    }
    ref = sagd.fit(Xf, Y, **FAST)
    for name, data in variants.items():
        m = sagd.fit(data, Y, **FAST)
        assert same_weights(m, weights_of(ref)), name
        assert np.array_equal(m.predict(data), ref.predict(Xf)), name


def test_integer_bool_and_float16_inputs_train():
    pixels = np.rint(X * 16).astype(np.uint8)            # the digits' own integer pixels
    a = sagd.fit(pixels, Y, **FAST)
    b = sagd.fit(pixels.astype(np.int64), Y, **FAST)
    c = sagd.fit(pixels.astype(np.float16), Y, **FAST)
    assert same_weights(a, weights_of(b)) and same_weights(a, weights_of(c))
    assert sagd.fit(X > 0.5, Y, **dict(FAST, epochs=20)).score(X > 0.5, Y) > 0.5


def test_sparse_input():
    sp = pytest.importorskip("scipy.sparse")
    dense = sagd.fit(X, Y, **FAST)
    sparse = sagd.fit(sp.csr_matrix(X), Y, **FAST)
    assert same_weights(sparse, weights_of(dense))
    assert np.array_equal(sparse.predict(sp.csr_matrix(X)), dense.predict(X))
    with pytest.raises(TypeError, match="needs CSR: pass X.tocsr()"):
        sagd.fit(sp.csc_matrix(X), Y, **FAST)
    with pytest.raises(ValueError, match="must hold numbers"):
        sagd.fit(np.array([["a"] * 3] * 4), [0, 1, 0, 1], **FAST)


# ---------------------------------------------------------------------- parameters


@pytest.mark.parametrize("kw,msg", [
    (dict(hidden=(-3,)), "hidden layer width must be a positive integer"),
    (dict(hidden=(16, 0)), "hidden layer width must be a positive integer"),
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(weights="int4"), "weights='int4' is not valid; choose one of 'fp32', 'bf16', 'fp16', "
                           "'int8'"),
    (dict(optimizer="rmsprop"), "optimizer='rmsprop' is not valid; choose one of 'sgd', "
                                "'adam', 'adamw'"),
    (dict(rounding="up"), "rounding='up' is not valid; choose one of 'stochastic', 'nearest'"),
    (dict(activation="swish"), "activation='swish' is not valid"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(momentum=1.5, optimizer="sgd"), "momentum must be in"),
    (dict(memory_budget="1KB"), "memory_budget=1.0 KB is below the"),
    (dict(validation_fraction=1.5), "validation_fraction must be in"),
])
def test_bad_parameters_are_rejected_at_fit(kw, msg):
    model = sagd.Model(**kw)                  # storing settings never fails
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        model.fit(X, Y)
    assert not model.fitted


def test_estimators_reject_bad_parameters_at_fit():
    pytest.importorskip("sklearn")
    for kw, msg in ((dict(solver="lbfgs"), "'adam', 'adamw', 'sgd'"),
                    (dict(activation="softplus"), "'relu', 'tanh', 'logistic'"),
                    (dict(weights="fp8"), "'fp32', 'bf16', 'fp16', 'int8'"),
                    (dict(memory_budget="2KB"), "is below the"),
                    (dict(batch_size=0), "batch_size must be 'auto' or a positive integer")):
        clf = sagd.MLPClassifier(**kw)
        with pytest.raises(ValueError, match=msg):
            clf.fit(X, Y)
