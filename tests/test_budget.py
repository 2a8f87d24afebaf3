"""The memory budget: every byte sagd allocates while fitting and predicting stays within
it (tracemalloc sees numpy's allocations), the planner's arithmetic, and the errors."""
import tracemalloc

import numpy as np
import pytest

import sagd
from sagd.budget import BOOKKEEPING, micro_batch_sizes
from sagd.datasets import load_digits

X_ALL, Y_ALL = load_digits()
X, Y = X_ALL[:240], Y_ALL[:240]


def peak_of(fn):
    """Peak bytes allocated (tracemalloc) while fn runs, above what existed before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


GRID = [(hidden, weights, optimizer)
        for hidden in [(32,), (48, 24)]
        for weights in sagd.FORMATS
        for optimizer in ["sgd", "adam"]]


@pytest.mark.parametrize("hidden,weights,optimizer", GRID)
@pytest.mark.parametrize("budget_kind", ["minimum", "tight", "roomy"])
def test_fit_and_predict_stay_within_the_budget(hidden, weights, optimizer, budget_kind):
    least = sagd.plan(64, hidden, 10, batch_size=32, weights=weights, optimizer=optimizer,
                      memory_budget=None).min_budget
    budget = {"minimum": least, "tight": int(1.3 * least), "roomy": 4 * 2**20}[budget_kind]
    kw = dict(hidden=hidden, weights=weights, optimizer=optimizer, memory_budget=budget,
              batch_size=32, epochs=1, seed=1)
    model, peak = peak_of(lambda: sagd.fit(X, Y, **kw))
    assert peak <= budget, f"fit peaked at {peak} bytes, budget {budget}"
    if budget_kind == "minimum":
        assert model.plan.micro_batch == 1
    assert model.plan.total <= budget
    pred, peak = peak_of(lambda: model.predict(X))
    assert peak <= budget, f"predict peaked at {peak} bytes, budget {budget}"
    assert pred.shape == (X.shape[0],)


def test_the_plan_accounts_for_what_fit_allocates():
    """The measured peak is close to the plan: the plan is not a loose upper bound."""
    model, peak = peak_of(lambda: sagd.fit(X, Y, hidden=(64,), epochs=1, batch_size=32,
                                           memory_budget=None))
    assert peak <= model.plan.total
    assert peak >= model.plan.total - BOOKKEEPING - 64 * 1024


def test_data_larger_than_the_budget_is_read_in_place(tmp_path):
    """A memmap bigger than the whole budget trains: X is never copied whole."""
    n, d = 6000, 100
    path = tmp_path / "big.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    rng = np.random.default_rng(0)
    for s in range(0, n, 1000):
        mm[s:s + 1000] = rng.standard_normal((1000, d), dtype=np.float32)
    mm.flush()
    X_big = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    y_big = (np.asarray(X_big[:, 0]) > 0).astype(np.int64)
    budget = 512 * 1024
    assert X_big.nbytes > budget
    model, peak = peak_of(lambda: sagd.fit(X_big, y_big, hidden=(16,), epochs=2, lr=1e-2,
                                           memory_budget=budget))
    assert peak <= budget
    assert model.score(X_big[:1000], y_big[:1000]) > 0.9


def test_micro_batches_keep_the_batch_size_meaning():
    """A budget that cannot hold a batch of 64 trains with micro-batches whose gradients
    add up to the batch's: plain SGD momentum matches the unconstrained run closely."""
    kw = dict(hidden=(32,), optimizer="sgd", momentum=0.9, lr=0.05, weights="fp32",
              batch_size=64, epochs=2, seed=4)
    free = sagd.fit(X, Y, memory_budget=None, **kw)
    least = sagd.plan(64, (32,), 10, batch_size=64, weights="fp32", optimizer="sgd",
                      memory_budget=None).min_budget
    tight = sagd.fit(X, Y, memory_budget=least + 20 * 4 * (64 + 32 + 10), **kw)
    assert tight.plan.micro_batch < 64
    for a, b in zip(free.network.layers, tight.network.layers):
        np.testing.assert_allclose(a.W.to_float(), b.W.to_float(), rtol=1e-4, atol=1e-5)


def test_micro_batch_sizes_differ_by_at_most_one():
    assert micro_batch_sizes(64, 64) == [64]
    assert micro_batch_sizes(64, 20) == [16, 16, 16, 16]
    assert micro_batch_sizes(10, 3) == [3, 3, 2, 2]
    assert sum(micro_batch_sizes(1000, 7)) == 1000


def test_impossible_budget_names_the_minimum_and_the_breakdown():
    with pytest.raises(sagd.MemoryBudgetError) as err:
        sagd.fit(X, Y, hidden=(256,), memory_budget="64KB")
    e = err.value
    assert e.budget == 64 * 1024 and e.min_budget > e.budget
    msg = str(e)
    assert "memory_budget=64.0 KB is below" in msg and "weights" in msg
    assert "optimizer state" in msg
    assert sum(e.breakdown.values()) == e.min_budget


def test_plan_without_training():
    p = sagd.plan(784, (256,), 10, batch_size=128, weights="bf16", optimizer="adam",
                  memory_budget="8MB")
    assert isinstance(p, sagd.MemoryPlan)
    n_params = 784 * 256 + 256 + 256 * 10 + 10
    assert p.breakdown["weights"] == 2 * n_params
    assert p.breakdown["optimizer state"] == 2 * 2 * n_params
    assert p.micro_batch == 128 and p.total <= 8 * 2**20
    assert "micro-batch 128 of batch 128" in str(p)
    assert p.min_budget < p.total
    with pytest.raises(sagd.MemoryBudgetError):
        sagd.plan(784, (256,), 10, memory_budget=p.min_budget - 1)
    assert sagd.plan(784, (256,), 10, memory_budget=p.min_budget).micro_batch == 1


@pytest.mark.parametrize("text,expected", [("512KB", 512 * 1024), ("16MB", 16 * 2**20),
                                           ("1.5GB", int(1.5 * 2**30)), ("100 MiB", 100 * 2**20),
                                           ("2048", 2048), (4096, 4096)])
def test_budgets_parse(text, expected):
    assert sagd.parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["abc", "12 parsecs", "-5MB", "0", 0, -1, True, 3.5, "MB"])
def test_nonsense_budgets_are_rejected(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        sagd.fit(X, Y, memory_budget=bad)
