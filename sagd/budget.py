"""The memory budget: what it is, how it is spent, and the error when it cannot be met.

Every byte sagd allocates while fitting or predicting is one of the parts below. The
planner sizes the parts that can shrink (micro-batch, tile rows, prediction chunk) before
anything is allocated, so that their sum stays within the budget.
"""
import math
import re
from dataclasses import dataclass, field

from . import _kernels
from .formats import BYTES, bias_format

#: Python objects of a fit or predict call (model object, lists, small arrays, kernel
#: argument views): measured with tracemalloc across the test grid, plus headroom.
BOOKKEEPING = 96 * 1024
#: Tile rows large enough that BLAS runs at full speed, when the budget allows.
EFFICIENT_TILE_ROWS = 32
#: Largest weight-gradient tile: beyond this a tile stops fitting in a core's cache.
TILE_BYTES_CAP = 1 << 20
#: Rows predicted together. Fixed, not taken from the data: a row then always goes through
#: the same matrix shapes, and BLAS gives it the same bits whatever else is predicted.
PREDICT_CHUNK = 256
#: Per-sample bytes of batch bookkeeping besides the target: shuffled index (8), sample
#: weight as given and as fp32 (8 + 4), label lookups (8 + 4 + 8), and slack.
BATCH_BYTES = 48

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


class MemoryBudgetError(ValueError):
    """The memory budget is smaller than the least the job needs.

    Attributes: budget and min_budget (bytes), breakdown (bytes by part, at the least).
    """

    def __init__(self, message, budget, min_budget, breakdown):
        super().__init__(message)
        self.budget = budget
        self.min_budget = min_budget
        self.breakdown = breakdown


def parse_budget(value, name="memory_budget"):
    """Bytes from "512KB", "16MB", "1.5GB", "100 MiB" or an int; None stays None.
    KB, MB and GB are powers of 1024, as memory tools print them."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size")
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0
                                  and value.dtype.kind in "iu"):
        size = int(value)
    elif isinstance(value, str) and _SIZE.match(value):
        number, unit = _SIZE.match(value).groups()
        if unit.upper() not in _UNITS:
            raise ValueError(f"{name}={value!r} has an unknown unit {unit!r}; use B, KB, MB, "
                             "GB or TB (or KiB, MiB, GiB)")
        size = int(float(number) * _UNITS[unit.upper()])
    else:
        raise ValueError(f"{name}={value!r} is not a size; write e.g. '512KB', '16MB', "
                         "'1.5GB', or a number of bytes")
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be a positive size")
    return size


def format_bytes(n):
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Spec:
    """What the plan depends on: the network and how it is stored and trained."""
    sizes: tuple            # features, hidden widths..., outputs
    activation: str = "relu"
    weights: str = "bf16"
    state: str = "bf16"
    n_states: int = 2       # optimizer state tensors per parameter: adam 2, momentum 1, sgd 0
    early_stopping: bool = False
    target_bytes: int = 8   # bytes of one sample's target as given (label or row of targets)
    slots: int = 1          # threads that process tiles at once, each with its own scratch

    @property
    def layers(self):
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def n_params(self):
        return sum(i * o + o for i, o in self.layers)

    def weight_bytes(self):
        w, b = BYTES[self.weights], BYTES[bias_format(self.weights)]
        scales = 4 if self.weights == "int8" else 0
        return sum(o * i * w + o * scales + o * b for i, o in self.layers)

    def state_bytes(self):
        return self.n_states * self.n_params * BYTES[self.state]

    def scratch_floats(self, tiles, training):
        size = _kernels.backward_scratch_size if training else _kernels.forward_scratch_size
        return max(size(self.weights, bias_format(self.weights), t, i, self.slots)
                   for t, (i, _) in zip(tiles, self.layers))

    def full_tiles(self):
        """Tile rows with no budget in the way: a layer split evenly over the threads,
        each tile at most TILE_BYTES_CAP."""
        tiles = []
        for i, o in self.layers:
            t = min(o, max(1, TILE_BYTES_CAP // (4 * i)))
            pieces = -(-o // t)
            pieces = -(-pieces // self.slots) * self.slots      # a multiple of the threads
            tiles.append(max(1, -(-o // pieces)))
        return tuple(tiles)

    def tiles_within(self, floats, training):
        """Per layer, the most rows whose scratch fits in `floats` (at least 1), capped as
        in full_tiles."""
        size = _kernels.backward_scratch_size if training else _kernels.forward_scratch_size
        tiles = []
        for (i, o), top in zip(self.layers, self.full_tiles()):
            lo, hi = 1, top
            while lo < hi:      # largest t in [lo, hi] with size(t) <= floats
                mid = (lo + hi + 1) // 2
                if size(self.weights, bias_format(self.weights), mid, i, self.slots) <= floats:
                    lo = mid
                else:
                    hi = mid - 1
            tiles.append(lo)
        return tuple(tiles)


@dataclass
class MemoryPlan:
    """How a job spends its memory budget.

    min_budget: bytes needed at the least (micro-batch 1, one-row tiles);
    breakdown: bytes by part for this plan; tile_rows: rows of each layer's weights
    processed at once; micro_batch: samples per forward/backward pass (fit) or per chunk
    (predict).
    """
    kind: str
    budget: object
    min_budget: int
    breakdown: dict
    tile_rows: tuple
    micro_batch: int
    batch_size: int
    threads: int = 1
    notes: list = field(default_factory=list)

    @property
    def total(self):
        return sum(self.breakdown.values())

    def __str__(self):
        head = (f"sagd memory plan ({self.kind}): {format_bytes(self.total)}"
                + (f", budget {format_bytes(self.budget)}" if self.budget else
                   ", no budget set")
                + f", at least {format_bytes(self.min_budget)} needed")
        width = max(len(k) for k in self.breakdown)
        lines = [head] + [f"  {k:<{width}}  {format_bytes(v):>10}"
                          for k, v in self.breakdown.items()]
        rows = ", ".join(map(str, self.tile_rows))
        tiles = (f"weights {'read' if self.kind == 'predict' else 'updated'} {rows} rows at a "
                 f"time (per layer), on {self.threads} thread{'s' if self.threads > 1 else ''}")
        if self.kind == "fit":
            lines.append(f"  micro-batch {self.micro_batch} of batch {self.batch_size}; {tiles}")
        else:
            lines.append(f"  chunks of {self.micro_batch} rows; {tiles}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self):
        return {"kind": self.kind, "budget": self.budget, "min_budget": self.min_budget,
                "breakdown": dict(self.breakdown), "tile_rows": list(self.tile_rows),
                "micro_batch": self.micro_batch, "batch_size": self.batch_size,
                "threads": self.threads}


def _fit_parts(spec, mb, tiles):
    widths = spec.sizes[1:]
    hidden = widths[:-1]
    gelu = sum(hidden) if spec.activation == "gelu" else 0
    n_grad = min(len(hidden), 2)
    parts = {
        "weights": spec.weight_bytes(),
        "optimizer state": spec.state_bytes(),
        "best weights copy": spec.weight_bytes() if spec.early_stopping else 0,
        "activations": 4 * mb * (spec.sizes[0] + sum(widths) + gelu),
        "layer gradients": 4 * mb * n_grad * (max(hidden) if hidden else 0),
        "gradient tiles": 4 * spec.scratch_floats(tiles, training=True),
        # the per-sample bookkeeping, and the list of input columns the first layer reads
        "batch": mb * (BATCH_BYTES + 4 * spec.target_bytes) + 4 * spec.sizes[0],
        "bookkeeping": BOOKKEEPING,
    }
    return {k: v for k, v in parts.items() if v or k == "weights"}


def _predict_parts(spec, chunk, tiles, n_rows, out_bytes):
    widths = spec.sizes[1:]
    return {
        "weights": spec.weight_bytes(),
        "activations": 4 * chunk * (spec.sizes[0] + 2 * max(widths)),
        "weight tiles": 4 * spec.scratch_floats(tiles, training=False),
        "output": n_rows * out_bytes,
        "chunk temporaries": chunk * (BATCH_BYTES + 8 * widths[-1]),
        "bookkeeping": BOOKKEEPING,
    }


def _too_small(what, budget, least, parts):
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
    return MemoryBudgetError(
        f"memory_budget={format_bytes(budget)} is below the {format_bytes(least)} {what} "
        f"needs at the least: {detail}", budget, least, parts)


def _largest(fits, hi):
    """Largest m in [1, hi] with fits(m), or 0 (fits is monotone)."""
    if fits(hi):
        return hi
    lo = 0
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan_fit(spec, batch_size, budget):
    """Micro-batch and tile rows for training spec with batches of batch_size."""
    ones = (1,) * len(spec.layers)
    least = _fit_parts(spec, 1, ones)
    min_budget = sum(least.values())
    full = spec.full_tiles()
    if budget is None:
        parts = _fit_parts(spec, batch_size, full)
        return MemoryPlan("fit", None, min_budget, parts, full, batch_size, batch_size,
                          spec.slots)
    if budget < min_budget:
        raise _too_small("this model", budget, min_budget, least)

    def total(mb, tiles):
        return sum(_fit_parts(spec, mb, tiles).values())

    efficient = tuple(min(o, EFFICIENT_TILE_ROWS) for _, o in spec.layers)
    base = efficient if total(1, efficient) <= budget else ones
    mb = _largest(lambda m: total(m, base) <= budget, batch_size)
    # spend what is left on larger tiles
    spare = budget - total(mb, ones) + 4 * spec.scratch_floats(ones, True)
    tiles = spec.tiles_within(spare // 4, training=True)
    parts = _fit_parts(spec, mb, tiles)
    plan = MemoryPlan("fit", budget, min_budget, parts, tiles, mb, batch_size, spec.slots)
    if mb < batch_size:
        plan.notes.append(
            f"batches of {batch_size} are split into micro-batches of at most {mb}; their "
            "gradients accumulate before the weights change")
    return plan


def plan_predict(spec, n_rows, out_bytes, budget):
    """Chunk size and tile rows for predicting n_rows rows whose result takes out_bytes
    per row."""
    ones = (1,) * len(spec.layers)
    least = _predict_parts(spec, 1, ones, n_rows, out_bytes)
    min_budget = sum(least.values())
    full = spec.full_tiles()
    cap = PREDICT_CHUNK
    if budget is None:
        parts = _predict_parts(spec, cap, full, n_rows, out_bytes)
        return MemoryPlan("predict", None, min_budget, parts, full, cap, cap, spec.slots)
    if budget < min_budget:
        raise _too_small(f"predicting {n_rows} rows", budget, min_budget, least)

    def total(chunk, tiles):
        return sum(_predict_parts(spec, chunk, tiles, n_rows, out_bytes).values())

    efficient = tuple(min(o, EFFICIENT_TILE_ROWS) for _, o in spec.layers)
    base = efficient if total(1, efficient) <= budget else ones
    chunk = _largest(lambda m: total(m, base) <= budget, cap)
    spare = budget - total(chunk, ones) + 4 * spec.scratch_floats(ones, False)
    tiles = spec.tiles_within(spare // 4, training=False)
    return MemoryPlan("predict", budget, min_budget,
                      _predict_parts(spec, chunk, tiles, n_rows, out_bytes), tiles, chunk,
                      chunk, spec.slots)


def micro_batch_sizes(batch, micro):
    """Split a batch into ceil(batch / micro) micro-batches whose sizes differ by at most 1."""
    k = math.ceil(batch / micro)
    return [batch // k + (1 if i < batch % k else 0) for i in range(k)]
