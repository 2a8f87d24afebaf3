"""The training loop: epochs over the caller's data in shuffled batches, each batch split
into the micro-batches the memory plan allows, loss and backward pass with the fused
update, validation, early stopping and progress.

It knows nothing of estimators or files: a Trainer is built from plain settings, and its
whole state (network, counters, curves) is attributes that other modules read.
"""
import math
import sys
import time

import numpy as np

from . import _kernels
from .budget import micro_batch_sizes
from .data import encode_labels, gather

#: permutation round that splits off the validation set (epochs use rounds 0, 1, ...)
SPLIT_ROUND = 0xFFFFFFFF


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss or update. The weights keep their last finite
    values (a non-finite value is never stored)."""


class Trainer:
    """Trains a Network under a memory plan.

    loss: "softmax" (labels 0..K-1), "sigmoid" (labels 0/1, one output) or "squared".
    """

    def __init__(self, network, optimizer, loss, plan, seed, stochastic):
        self.network = network
        self.optimizer = optimizer
        self.loss = loss
        self.plan = plan
        self.seed = int(seed)
        self.stochastic = stochastic
        self.step = 0               # optimizer steps taken
        self.epoch = 0              # epochs (or partial_fit passes) begun
        self.lr_scale = 1.0         # "adaptive" schedule divides this on plateaus
        self.total_steps = 1        # horizon of the cosine schedule
        self.loss_curve = []
        self.validation_scores = []
        self.best_loss = math.inf
        self.best_score = -math.inf
        self.no_improvement = 0
        self.steps = (optimizer.kernel_step(self.seed, stochastic, weights=True),
                      optimizer.kernel_step(self.seed, stochastic, weights=False))
        self.buf = None
        self.best_copy = None

    # ------------------------------------------------------------------ memory

    def allocate(self, early_stopping):
        """The buffers the plan counted (all of them, before any training)."""
        plan = self.plan
        net = self.network
        self.buf = net.allocate(plan.micro_batch, plan.tile_rows, training=True,
                                slots=plan.threads)
        rows = plan.micro_batch
        self.buf.idx = np.empty(rows, np.int64)
        self.buf.w = np.empty(rows, np.float32)
        if self.loss == "squared":
            self.buf.y = np.empty((rows, net.sizes[-1]), np.float32)
        else:
            self.buf.y = np.empty(rows, np.int32)
        if early_stopping:
            self.best_copy = [(t.codes.copy(), None if t.scales is None else t.scales.copy())
                              for layer in net.layers for t in (layer.W, layer.b)]

    def release(self):
        self.buf = None

    # ------------------------------------------------------------------ one batch

    def _rows(self, positions, n_total, n_train, shuffle, epoch, out):
        """Rows of X for positions (in the training order of `epoch`), in out."""
        m = positions.stop - positions.start
        idx = out[:m]
        idx[:] = np.arange(positions.start, positions.stop)
        if shuffle:
            _kernels.permute(n_train, self.seed, epoch, idx)
        if n_train < n_total:       # positions of the training part of the split
            _kernels.permute(n_total, self.seed, SPLIT_ROUND, idx)
        idx.sort()                  # order within a pass does not matter; locality does
        return idx

    def _targets(self, y, idx, classes):
        m = idx.shape[0]
        if self.loss == "squared":
            y2 = y.reshape(y.shape[0], -1)
            if y2.dtype in (np.float32, np.float64):
                return gather(y2, idx, self.buf.y)
            self.buf.y[:m] = y2[idx]
            return self.buf.y[:m]
        return encode_labels(y[idx], classes, self.buf.y)

    def _weights(self, sample_weight, idx):
        if sample_weight is None:
            return None
        w = self.buf.w[: idx.shape[0]]
        w[:] = sample_weight[idx]
        return w

    def _loss_and_grad(self, logits, targets, w, scale, grad=True):
        if self.loss == "softmax":
            return _kernels.softmax_xent(logits, targets, w, scale, grad)
        if self.loss == "sigmoid":
            return _kernels.sigmoid_xent(logits, targets, w, scale, grad)
        return _kernels.squared_error(logits, targets, w, scale, grad)

    def train_batch(self, X, y, sample_weight, classes, positions, n_total, n_train, shuffle):
        """One optimizer step on the batch at `positions`; returns (weighted loss sum,
        weight sum)."""
        sizes = micro_batch_sizes(positions.stop - positions.start, self.plan.micro_batch)
        idx = self.buf.idx
        # the batch's total weight normalises every micro-batch's share of the gradient
        passes, start = [], positions.start
        for size in sizes:
            passes.append(range(start, start + size))
            start += size
        if sample_weight is None:
            shares = [float(len(p)) for p in passes]
        else:
            shares = []
            for p in passes:
                rows = self._rows(p, n_total, n_train, shuffle, self.epoch, idx)
                shares.append(float(np.sum(sample_weight[rows])))
        total = sum(shares)
        if total <= 0:
            return 0.0, 0.0
        t = self.step + 1           # counted once the step has changed something
        lr = self.optimizer.prepare(self.steps, t, self.total_steps, self.lr_scale)
        loss_sum = 0.0
        for k, (p, share) in enumerate(zip(passes, shares)):
            rows = self._rows(p, n_total, n_train, shuffle, self.epoch, idx)
            m = rows.shape[0]
            gather(X, rows, self.buf.x)
            targets = self._targets(y, rows, classes)
            w = self._weights(sample_weight, rows)
            logits, overflow = self.network.forward_train(self.buf, m)
            loss = self._loss_and_grad(logits, targets, w, 1.0 / total)
            if overflow or not math.isfinite(loss):
                raise TrainingDivergedError(
                    f"activations overflowed at epoch {self.epoch + 1}, step {t} "
                    f"(learning rate {lr:.3g}; loss {loss:.4g}), before the step. Scale the input "
                    "(e.g. with StandardScaler) or lower the learning rate. The model keeps "
                    "its last finite weights.")
            for s in self.steps:
                s.set_phase(begin=k == 0, apply=k == len(passes) - 1)
                s.micro = k
                s.vscale = s.gscale = total / share if share > 0 else 1.0
            bad = self.network.backward(self.buf, m, *self.steps)
            self.step = t
            if bad:
                raise TrainingDivergedError(
                    f"{bad} weight or optimizer-state updates were not finite at epoch "
                    f"{self.epoch + 1}, step {t} (learning rate {lr:.3g}); they were "
                    "not stored, and the model keeps its last finite weights. Scale the input "
                    "(e.g. with StandardScaler) or lower the learning rate.")
            loss_sum += loss
        return loss_sum, total

    # ------------------------------------------------------------------ epochs

    def run_epoch(self, X, y, sample_weight, classes, n_train, shuffle, progress=None):
        """One pass over the first n_train positions of the (split) data; returns the mean
        training loss."""
        n_total = X.shape[0]
        batch = self.plan.batch_size
        loss_sum = weight_sum = 0.0
        for start in range(0, n_train, batch):
            positions = range(start, min(n_train, start + batch))
            ls, ws = self.train_batch(X, y, sample_weight, classes, positions, n_total,
                                      n_train, shuffle)
            loss_sum += ls
            weight_sum += ws
            if progress is not None:
                progress.batch(positions.stop, n_train, loss_sum / max(weight_sum, 1e-300))
        self.epoch += 1
        return loss_sum / max(weight_sum, 1e-300)

    def score(self, X, y, classes, rows_range, n_total, split):
        """Accuracy (classification) or R^2 averaged over outputs (regression) on the
        positions in rows_range, in chunks of the micro-batch."""
        chunk = self.plan.micro_batch
        idx = self.buf.idx
        correct = count = 0
        k = self.network.sizes[-1]
        s_y = np.zeros(k)
        s_yy = np.zeros(k)
        s_rr = np.zeros(k)
        for start in range(rows_range.start, rows_range.stop, chunk):
            p = range(start, min(rows_range.stop, start + chunk))
            m = len(p)
            rows = idx[:m]
            rows[:] = np.arange(p.start, p.stop)
            if split:
                _kernels.permute(n_total, self.seed, SPLIT_ROUND, rows)
            gather(X, rows, self.buf.x)
            targets = self._targets(y, rows, classes)
            logits, _ = self.network.forward_train(self.buf, m)
            if self.loss == "squared":
                t = targets.astype(np.float64)
                s_y += t.sum(axis=0)
                s_yy += (t * t).sum(axis=0)
                s_rr += ((logits - targets).astype(np.float64) ** 2).sum(axis=0)
            else:
                pred = (logits[:, 0] > 0) if self.loss == "sigmoid" else logits.argmax(axis=1)
                correct += int(np.sum(pred == targets))
            count += m
        if self.loss != "squared":
            return correct / count
        ss_tot = s_yy - s_y * s_y / count
        r2 = np.where(ss_tot > 0, 1 - s_rr / np.where(ss_tot > 0, ss_tot, 1), 0.0)
        return float(np.mean(r2))

    def keep_best(self):
        if self.best_copy is None:
            return
        tensors = [t for layer in self.network.layers for t in (layer.W, layer.b)]
        for t, (codes, scales) in zip(tensors, self.best_copy):
            codes[...] = t.codes
            if scales is not None:
                scales[...] = t.scales

    def restore_best(self):
        if self.best_copy is None:
            return
        tensors = [t for layer in self.network.layers for t in (layer.W, layer.b)]
        for t, (codes, scales) in zip(tensors, self.best_copy):
            t.codes[...] = codes
            if scales is not None:
                t.scales[...] = scales

    def end_of_epoch(self, loss, val_score, tol, n_iter_no_change, early_stopping):
        """Record the epoch; returns True when training should stop."""
        self.loss_curve.append(float(loss))
        if val_score is not None:
            self.validation_scores.append(float(val_score))
        adaptive = self.optimizer.schedule == "adaptive"
        if early_stopping:
            if val_score > self.best_score + (tol or 0.0):
                self.no_improvement = 0
            else:
                self.no_improvement += 1
            if val_score > self.best_score:
                self.best_score = val_score
                self.keep_best()
        elif tol is not None or adaptive:
            if loss > self.best_loss - (tol or 0.0):
                self.no_improvement += 1
            else:
                self.no_improvement = 0
            self.best_loss = min(self.best_loss, loss)
        if adaptive and self.no_improvement > 1 and not early_stopping:
            self.lr_scale /= 5.0
            self.no_improvement = 0
            return self.optimizer.lr * self.lr_scale < 1e-6
        if tol is None and not early_stopping:
            return False
        return self.no_improvement > n_iter_no_change


class Progress:
    """Progress on stderr: one updating line on a terminal; one line per epoch in a file."""

    def __init__(self, epochs, stream=None):
        self.epochs = epochs
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.epoch = 0
        self.last = 0.0
        self.val = None

    def start_epoch(self, epoch):
        self.epoch = epoch
        self.val = None
        self.t_epoch = time.perf_counter()

    def _line(self, done, total, loss, rate):
        val = "" if self.val is None else f"  val {self.val:.4f}"
        return (f"sagd: epoch {self.epoch}/{self.epochs}  {100 * done // total:3d}%  "
                f"loss {loss:.4f}{val}  {rate:,.0f} samples/s")

    def batch(self, done, total, loss):
        now = time.perf_counter()
        if not self.tty or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        rate = done / max(now - self.t_epoch, 1e-9)
        self.stream.write("\r" + self._line(done, total, loss, rate) + " ")
        self.stream.flush()

    def end_epoch(self, loss, val, n):
        self.val = val
        rate = n / max(time.perf_counter() - self.t_epoch, 1e-9)
        line = self._line(n, n, loss, rate)
        self.stream.write(("\r" + line + " ") if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
