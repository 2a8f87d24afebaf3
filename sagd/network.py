"""A stack of dense layers whose parameters and optimizer state live in storage formats,
with the buffers of one forward/backward pass sized by a memory plan."""
import math

import numpy as np

from . import _kernels
from .formats import bias_format, new_tensor

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "identity")
#: stream of the initial values of a tensor (training steps use 0.. as micro-batch index)
INIT_PASS = 0xFFFF
#: In training, the first layer skips the input columns that are zero in the whole batch
#: (images with empty borders, one-hot or count features) once at least this share of them
#: is: below it, gathering the weights' other columns costs about what it saves.
ZERO_COLUMNS_WORTH_SKIPPING = 1 / 8


class Layer:
    """z = a @ W^T + b, then the activation. W: (n_out, n_in), b: (n_out,)."""

    def __init__(self, n_in, n_out, activation, weights, first_id):
        self.activation = activation
        self.W = new_tensor(weights, (n_out, n_in), first_id)
        self.b = new_tensor(bias_format(weights), (n_out,), first_id + 1)
        self.states = {}            # "mW", "vW", "mb", "vb" -> Stored

    @property
    def n_in(self):
        return self.W.cols

    @property
    def n_out(self):
        return self.W.rows

    def tensors(self):
        """Every stored tensor of the layer by name: parameters, then optimizer state."""
        return {"W": self.W, "b": self.b, **self.states}


class Network:
    """Dense layers sizes[0] -> sizes[1] -> ... -> sizes[-1]; hidden layers use
    `activation`, the output layer is linear (the loss applies softmax or sigmoid)."""

    def __init__(self, sizes, activation, weights):
        self.sizes = tuple(int(s) for s in sizes)
        self.activation = activation
        self.weights = weights
        self.layers = []
        for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            act = activation if i < len(self.sizes) - 2 else "identity"
            # 8 stream ids per layer: W, b, and states mW, vW, mb, vb
            self.layers.append(Layer(n_in, n_out, act, weights, first_id=8 * i))
        self.buffers = None

    def add_states(self, n_states, fmt):
        """Zeroed optimizer state: 1 (momentum) or 2 (Adam's moments) per tensor."""
        for i, layer in enumerate(self.layers):
            names = (("mW", "mb"), ("vW", "vb"))[:n_states]
            for k, (nw, nb) in enumerate(names):
                layer.states[nw] = new_tensor(fmt, (layer.n_out, layer.n_in), 8 * i + 2 + 2 * k)
                layer.states[nb] = new_tensor(fmt, (layer.n_out,), 8 * i + 3 + 2 * k)

    def initialize(self, seed, stochastic, scratch):
        """Glorot-uniform weights (the bound of scikit-learn's MLP), zero biases. Drawn and
        rounded tile by tile through scratch, so no fp32 copy of a layer exists."""
        for layer in self.layers:
            factor = 2.0 if layer.activation == "sigmoid" else 6.0
            bound = math.sqrt(factor / (layer.n_in + layer.n_out))
            rows = max(1, min(layer.n_out, scratch.size // layer.n_in))
            for r0 in range(0, layer.n_out, rows):
                r1 = min(layer.n_out, r0 + rows)
                vals = scratch[: (r1 - r0) * layer.n_in]
                _kernels.uniform_fill(vals, -bound, bound, seed,
                                      (layer.W.tensor_id << 16) | INIT_PASS, 0,
                                      r0 * layer.n_in)
                layer.W.assign(vals, stochastic, seed, step=0, micro=0, r0=r0)

    @property
    def n_params(self):
        return sum(layer.n_in * layer.n_out + layer.n_out for layer in self.layers)

    # ------------------------------------------------------------------ buffers

    def allocate(self, rows, tile_rows, training, slots=1):
        """Buffers for passes of up to `rows` samples, with scratch for `slots` threads
        working on tiles at once (what the plan counted)."""
        hidden = self.sizes[1:-1]
        gelu = self.activation == "gelu" and training
        b = Buffers()
        b.rows = rows
        b.tile_rows = tuple(tile_rows)
        b.x = np.empty((rows, self.sizes[0]), np.float32)
        if training:
            b.cols = np.empty(self.sizes[0], np.int32)
            b.acts = [np.empty((rows, n), np.float32) for n in self.sizes[1:]]
            b.zs = [np.empty((rows, n), np.float32) if gelu else None for n in hidden] + [None]
            n_grad = min(len(hidden), 2)
            b.grads = [np.empty(rows * max(hidden), np.float32) for _ in range(n_grad)]
        else:
            # prediction keeps two activations alive at a time
            width = max(self.sizes[1:])
            b.pingpong = [np.empty(rows * width, np.float32) for _ in range(2)]
        size = _kernels.backward_scratch_size if training else _kernels.forward_scratch_size
        b.scratch = np.empty(max(1, max(
            size(self.weights, bias_format(self.weights), t, layer.n_in, slots)
            for t, layer in zip(b.tile_rows, self.layers))), np.float32)
        return b

    # ------------------------------------------------------------------ passes

    def _drop_zero_columns(self, buf, m):
        """buf.x[:m] without the columns that are zero in all m rows, when enough are (see
        ZERO_COLUMNS_WORTH_SKIPPING): (packed input, its columns), or (buf.x[:m], None)."""
        x = buf.x[:m]
        n_in = x.shape[1]
        n = _kernels.nonzero_columns(x, buf.cols)
        if n > (1 - ZERO_COLUMNS_WORTH_SKIPPING) * n_in:
            return x, None
        if n == 0:                  # an all-zero batch still goes through one column
            buf.cols[0], n = 0, 1
        cols = buf.cols[:n]
        return _kernels.pack_columns(x, cols), cols

    def forward_train(self, buf, m):
        """Forward pass on buf.x[:m] (whose zero columns it may drop, in place), keeping
        what the backward pass needs; returns the output layer's (m, n_out) block (logits)
        and the count of pre-activations that overflowed (NaN or inf)."""
        a, cols = self._drop_zero_columns(buf, m)
        buf.input, buf.input_cols = a, cols
        bad = 0
        for layer, out, z, tile in zip(self.layers, buf.acts, buf.zs, buf.tile_rows):
            out = out[:m]
            bad += _kernels.dense_forward(a, layer.W, layer.b, z[:m] if z is not None else out,
                                          out, layer.activation, tile, buf.scratch, cols)
            a, cols = out, None
        return a, bad

    def backward(self, buf, m, step, bias_step):
        """Backward pass (after forward_train) from the gradient in the output block,
        updating every layer; returns the count of updates that were not finite."""
        bad = 0
        g = buf.acts[-1][:m]
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            a_prev = buf.acts[i - 1][:m] if i > 0 else buf.input
            dA = None
            if i > 0:
                flat = buf.grads[(len(self.layers) - 1 - i) % len(buf.grads)]
                dA = flat[: m * layer.n_in].reshape(m, layer.n_in)
            s = layer.states
            bad += _kernels.dense_backward(g, a_prev, dA, layer.W, layer.b, s.get("mW"),
                                           s.get("vW"), s.get("mb"), s.get("vb"), step,
                                           buf.tile_rows[i], buf.scratch, bias_step,
                                           buf.input_cols if i == 0 else None)
            if i > 0:
                prev = self.layers[i - 1]
                z = buf.zs[i - 1]
                _kernels.act_backward(prev.activation, z[:m] if z is not None else a_prev,
                                      a_prev, dA)
                g = dA
        return bad

    def forward_predict(self, buf, m):
        """Forward pass on buf.x[:m] through ping-pong buffers; returns the (m, n_out)
        output block (logits) and the count of pre-activations that overflowed."""
        a = buf.x[:m]
        bad = 0
        for i, (layer, tile) in enumerate(zip(self.layers, buf.tile_rows)):
            out = buf.pingpong[i % 2][: m * layer.n_out].reshape(m, layer.n_out)
            bad += _kernels.dense_forward(a, layer.W, layer.b, out, out, layer.activation, tile,
                                          buf.scratch)
            a = out
        return a, bad


class Buffers:
    """The reusable fp32 buffers of one pass (batch input, activations, gradients, scratch)."""
    rows = 0
    tile_rows = ()
    x = None
    cols = None         # training: the input columns the first layer reads (int32)
    input = None        # training: the first layer's input in this pass, and its columns
    input_cols = None
    acts = None
    zs = None
    grads = None
    pingpong = None
    scratch = None
