"""Classifier accuracy of sagd.MLPClassifier against scikit-learn's MLPClassifier with
matching settings, on scikit-learn's digits and breast-cancer sets (70/30 stratified split,
StandardScaler, hidden (100,), adam, max_iter 200, same seeds). Prints a markdown table.

    python bench/sklearn_accuracy.py [--seeds 5]
"""
import argparse
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import sagd


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print("| dataset | sagd (bf16) | sagd (int8) | scikit-learn | difference (bf16) |")
    print("|---|---:|---:|---:|---:|")
    for name, (X, y) in {"digits": load_digits(return_X_y=True),
                         "breast cancer": load_breast_cancer(return_X_y=True)}.items():
        acc = {"bf16": [], "int8": [], "sk": []}
        for seed in range(args.seeds):
            Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed,
                                                  stratify=y)
            kw = dict(hidden_layer_sizes=(100,), max_iter=200, random_state=seed)
            for key in ("bf16", "int8"):
                m = make_pipeline(StandardScaler(), sagd.MLPClassifier(weights=key, **kw))
                acc[key].append(m.fit(Xtr, ytr).score(Xte, yte))
            acc["sk"].append(make_pipeline(StandardScaler(), SkMLP(**kw)).fit(Xtr, ytr)
                             .score(Xte, yte))
        mean = {k: 100 * np.mean(v) for k, v in acc.items()}
        print(f"| {name} ({args.seeds} splits) | {mean['bf16']:.2f}% | {mean['int8']:.2f}% | "
              f"{mean['sk']:.2f}% | {mean['bf16'] - mean['sk']:+.2f} points |")


if __name__ == "__main__":
    main()
