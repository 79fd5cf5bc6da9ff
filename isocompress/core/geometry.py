"""How a weight layer reads its input map: positions, pooling, kernel geometry (docs/math.md, "Convolutional networks").

A hidden space is C channels at P positions: a map of shape C × S with S the spatial shape (() for a vector, (L,)
in 1-D, (H, W) in 2-D; P = prod(S)). An MLP is the case S = () everywhere. A weight layer reads its input map
(C_in × S_in), optionally average-pools it, then applies a convolution with a kernel of shape K (K = () on a
vector: a dense layer), zero padding, stride and dilation; a *flatten* layer's kernel covers the whole pooled map,
so its output is a vector (a flatten + Linear head). Every one of these acts on each channel the same way, so it
commutes with rotations of the channel space (the symmetry isocompress uses).

Pure functions of shapes; the tensor operations live in `isocompress.core.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from isocompress.core.errors import IsocompressError


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise IsocompressError(f"geometry {name} {list(value)} has {len(value)} entries; the map has {n} spatial axes")
    return value


@dataclass(frozen=True)
class Pool:
    """Average pooling of the input map before the weight: windows `kernel` (per axis), `stride`, zero `padding`
    counted in the average (count_include_pad, torch's default). `kernel` None: global pooling, the mean over every
    position (the map becomes a vector)."""

    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kernel is None:
            object.__setattr__(self, "stride", ())
            object.__setattr__(self, "padding", ())
            return
        kernel = tuple(int(k) for k in self.kernel)
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "stride", _tuple(self.stride or kernel, len(kernel), "pool stride"))
        object.__setattr__(self, "padding", _tuple(self.padding or 0, len(kernel), "pool padding"))
        if any(k < 1 for k in kernel) or any(s < 1 for s in self.stride) or any(p < 0 for p in self.padding):
            raise IsocompressError("geometry: pool kernel and stride must be ≥ 1 and padding ≥ 0")
        if any(2 * p > k for p, k in zip(self.padding, kernel)):
            raise IsocompressError("geometry: pool padding must be at most half the pool kernel (as torch requires)")

    @property
    def is_global(self) -> bool:
        return self.kernel is None

    def out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if self.is_global:
            return ()
        return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(spatial, self.kernel, self.stride, self.padding))

    def overlap(self) -> int:
        """The most windows that hold one input position."""
        return 1 if self.is_global else math.prod(math.ceil(k / s) for k, s in zip(self.kernel, self.stride))

    def window(self, spatial: tuple[int, ...]) -> int:
        """Positions averaged per output (the divisor)."""
        return math.prod(spatial) if self.is_global else math.prod(self.kernel)

    def op_norm(self, spatial: tuple[int, ...]) -> float:
        """An upper bound on the pooling map's operator norm (per channel, on the whole map): each output is a mean of
        q positions (norm of its row 1/sqrt(q)) and each input position is in at most `overlap` windows, so
        ‖pool‖ ≤ sqrt(overlap / q) (docs/bounds.md, "Convolutional layers")."""
        return math.sqrt(self.overlap() / self.window(spatial))

    def to_dict(self) -> dict:
        return {"kernel": None if self.kernel is None else list(self.kernel), "stride": list(self.stride),
                "padding": list(self.padding)}


@dataclass(frozen=True)
class Geometry:
    """How a weight layer maps its input map (C_in × in_spatial) to its output map (C_out × out_spatial).
    The default, every field empty, is a dense layer on vectors (the MLP case)."""

    in_spatial: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pool: Pool | None = None
    flatten: bool = False
    _out: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_spatial", tuple(int(s) for s in self.in_spatial))
        d = len(self.pooled_spatial)
        for name in ("kernel", "stride", "padding", "dilation"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.kernel and d:
            raise IsocompressError(f"geometry: a map of shape {list(self.pooled_spatial)} needs a kernel")
        if self.kernel:
            defaults = {"stride": 1, "padding": 0, "dilation": 1}
            for name, default in defaults.items():
                object.__setattr__(self, name, _tuple(getattr(self, name) or default, len(self.kernel), name))
        self._validate(d)
        object.__setattr__(self, "_out", self._out_spatial())

    def _validate(self, d: int) -> None:
        if self.kernel and len(self.kernel) != d:
            raise IsocompressError(f"geometry: kernel {list(self.kernel)} has {len(self.kernel)} axes; the map has {d}")
        if any(v < 1 for v in self.kernel + self.stride + self.dilation) or any(v < 0 for v in self.padding):
            raise IsocompressError("geometry: kernel, stride and dilation must be ≥ 1 and padding ≥ 0")
        if any(s < 1 for s in self.in_spatial):
            raise IsocompressError(f"geometry: spatial shape {list(self.in_spatial)} must be positive")
        if self.flatten and self.kernel != self.pooled_spatial:
            raise IsocompressError(f"geometry: a flatten layer's kernel {list(self.kernel)} must cover the whole map"
                                   f" {list(self.pooled_spatial)}")
        if self.flatten and (set(self.stride) - {1} or set(self.padding) - {0} or set(self.dilation) - {1}):
            raise IsocompressError("geometry: a flatten layer has stride 1, no padding and dilation 1")
        if self.kernel and any(o < 1 for o in self._out_spatial()):
            raise IsocompressError(f"geometry: kernel {list(self.kernel)} (dilation {list(self.dilation)}) does not fit"
                                   f" the padded map {list(self.pooled_spatial)}")

    @property
    def pooled_spatial(self) -> tuple[int, ...]:
        if self.pool is None:
            return self.in_spatial
        if len(self.in_spatial) == 0:
            raise IsocompressError("geometry: pooling needs a map with positions")
        return self.pool.out_spatial(self.in_spatial)

    def _out_spatial(self) -> tuple[int, ...]:
        if not self.kernel or self.flatten:
            return ()
        return tuple((s + 2 * p - dl * (k - 1) - 1) // st + 1
                     for s, k, st, p, dl in zip(self.pooled_spatial, self.kernel, self.stride, self.padding,
                                                self.dilation))

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return self._out

    @property
    def is_dense(self) -> bool:
        """A dense layer on vectors (the MLP case): no positions in or out."""
        return not self.in_spatial

    @property
    def taps(self) -> int:
        """Kernel positions k (1 for a dense layer)."""
        return math.prod(self.kernel)

    @property
    def pointwise(self) -> bool:
        """The weight is a plain channel matrix at every position (dense, or a 1×1 kernel): it can be stored diagonal."""
        return self.taps == 1

    @property
    def in_positions(self) -> int:
        return math.prod(self.in_spatial)

    @property
    def out_positions(self) -> int:
        return math.prod(self.out_spatial)

    def overlap(self) -> int:
        """The most output windows that hold one (pooled) input position: per axis, the offsets δ of the kernel whose
        tap δ·dilation lands on a given position form one residue class modulo the stride, so at most
        ceil(k / (s / gcd(s, dilation))) of them (docs/bounds.md, "Convolutional layers")."""
        if not self.kernel:
            return 1
        per_axis = [math.ceil(k / (s // math.gcd(s, dl))) for k, s, dl in zip(self.kernel, self.stride, self.dilation)]
        return min(math.prod(per_axis), self.out_positions)

    def input_op_norm(self) -> float:
        """An upper bound on the norm of the map from the input map to the stacked windows the kernel reads: the
        pooling's norm times sqrt(overlap). ‖layer‖ ≤ this × ‖M‖₂ for the reshaped kernel M (C_out × C_in·k)."""
        pool = 1.0 if self.pool is None else self.pool.op_norm(self.in_spatial)
        return pool * math.sqrt(self.overlap())

    def to_dict(self) -> dict:
        return {"in_spatial": list(self.in_spatial), "kernel": list(self.kernel), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "pool": None if self.pool is None else self.pool.to_dict(), "flatten": self.flatten}

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "Geometry":
        if not isinstance(data, dict):
            raise IsocompressError(f"{where}: a layer geometry must be an object")
        allowed = {"in_spatial", "kernel", "stride", "padding", "dilation", "pool", "flatten"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise IsocompressError(f"{where}: geometry has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        pool = data.get("pool")
        if pool is not None:
            if not isinstance(pool, dict) or set(pool) - {"kernel", "stride", "padding"}:
                raise IsocompressError(f"{where}: geometry 'pool' must be an object with kernel, stride, padding")
            kernel = pool.get("kernel")
            pool = Pool(kernel=None if kernel is None else tuple(kernel), stride=tuple(pool.get("stride", ())),
                        padding=tuple(pool.get("padding", ())))
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k != "pool"},
                       pool=pool)
        except (TypeError, ValueError) as exc:
            raise IsocompressError(f"{where}: geometry is not valid ({exc})") from None

    def describe(self) -> str:
        """'dense', 'conv 3×3 s2 p1', 'flatten 5', 'avgpool 2 → conv 3' …: for tables."""
        parts = []
        if self.pool is not None:
            parts.append("global avgpool →" if self.pool.is_global else f"avgpool {_x(self.pool.kernel)} →")
        if not self.kernel:
            parts.append("dense")
        elif self.flatten:
            parts.append(f"flatten {_x(self.pooled_spatial)} → dense")
        else:
            extra = "".join(f" {tag}{_x(v)}" for tag, v, plain in (("s", self.stride, 1), ("p", self.padding, 0),
                                                                    ("d", self.dilation, 1)) if set(v) != {plain})
            parts.append(f"conv {_x(self.kernel)}{extra}")
        return " ".join(parts)


def _x(values) -> str:
    return "×".join(str(v) for v in values)


def pooled_window_geometry(pool: Pool, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(kernel, stride, padding) of a pooling as torch's avg_pool takes it (global: the whole map)."""
    if pool.is_global:
        return tuple(spatial), tuple(spatial), (0,) * len(spatial)
    return pool.kernel, pool.stride, pool.padding
