"""An HDF5 filter database in the spirit of CNN Filter DB: many models' k x k filters in one file.

Layout (all datasets resizable and chunked, so that models can be appended):

- ``/filters``        float32 (N, k^2): every filter, in the order the layers were appended;
- ``/filter_layer``   int32 (N,): the row of ``/layers`` each filter belongs to;
- ``/layers/<field>`` one 1-D dataset per field of LAYER_FIELDS (one row per convolution layer:
  its model, name, conv index, normalised depth, channels, groups, stride, dilation, the row
  range [start, start + count) of its filters, max |w| and its metrics);
- ``/models/<field>`` one 1-D dataset per field of MODEL_FIELDS (id, source, dataset, task, ...).

The root attributes ``kernel``, ``n_filters``, ``n_layers`` and ``n_models`` are the committed
sizes: an append writes the rows first and updates these last, so that a reader never sees a
half-appended model, and a file whose append was interrupted is trimmed back to its last
committed state the next time it is opened for appending. Readers go through ``iter_chunks`` or
row ranges, never the whole ``/filters`` array at once unless asked to (``read``, ``select``,
``groups`` return what they select).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convforge.errors import ConvforgeError
from convforge.inspect.filters import Filters
from convforge.inspect.metrics import METRIC_KEYS, weight_metrics

FORMAT = "convforge-filterdb"
VERSION = 1
CHUNK_ROWS = 1 << 16
READ_CHUNK = 1 << 18

_STR = "str"
LAYER_FIELDS: dict[str, Any] = {
    "model": np.int32, "name": _STR, "conv_index": np.int32, "depth": np.float32,
    "in_channels": np.int32, "out_channels": np.int32, "groups": np.int32, "stride": np.int32,
    "dilation": np.int32, "start": np.int64, "count": np.int64, "max_abs": np.float32,
    **{key: np.float64 for key in METRIC_KEYS},
}
MODEL_FIELDS: dict[str, Any] = {
    "id": _STR, "source": _STR, "dataset": _STR, "task": _STR, "architecture": _STR,
    "n_layers": np.int32, "n_filters": np.int64, "added": _STR,
}


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - a dependency of convforge
        raise ConvforgeError("the filter database needs h5py: pip install h5py") from None
    return h5py


def _dtype(kind: Any):
    return _h5py().string_dtype("utf-8") if kind is _STR else kind


class FilterDB:
    """A filter database file. ``FilterDB(path, "a")`` creates or appends, ``FilterDB(path)`` reads.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        h5py = _h5py()
        self.path = Path(path)
        self.mode = mode
        if mode == "r" and not self.path.is_file():
            raise ConvforgeError(f"filter database {self.path} does not exist; create it with "
                                 f"`convforge filters MODEL --db {self.path}`")
        if mode == "a" and self.path.is_dir():
            raise ConvforgeError(f"--db {self.path} is a folder; give a file name such as {self.path / 'filters.h5'}")
        self._file: Any = None
        if mode == "a" and not self.path.exists():
            return  # created (atomically, with its kernel size) on the first append
        try:
            self._file = h5py.File(self.path, mode)
        except OSError as exc:
            raise ConvforgeError(f"{self.path} is not a readable HDF5 file ({exc}); give a .h5 file written by "
                                 f"`convforge filters --db`, or a new file name") from None
        try:
            self._check()
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------ opening

    def _check(self) -> None:
        f = self._file
        if f.attrs.get("format") is None and "filters" not in f and len(f.keys()) == 0:
            if self.mode == "r":
                raise ConvforgeError(f"{self.path} is an empty HDF5 file, not a filter database")
            return  # a new file: created on the first append
        if f.attrs.get("format") != FORMAT or "filters" not in f:
            raise ConvforgeError(f"{self.path} is an HDF5 file but not a convforge filter database "
                                 f"(no {FORMAT!r} format attribute); use another --db file name")
        version = int(f.attrs.get("version", 0))
        if version > VERSION:
            raise ConvforgeError(f"{self.path} has filter-database version {version}; this convforge reads up to "
                                 f"{VERSION}: upgrade convforge")
        if self.mode == "a":
            self._trim()

    def _trim(self) -> None:
        """Drop rows written after the last commit (an interrupted append)."""
        f = self._file
        for dataset, size in (("filters", self.n_filters), ("filter_layer", self.n_filters)):
            if f[dataset].shape[0] != size:
                f[dataset].resize(size, axis=0)
        for group, size in (("layers", self.n_layers), ("models", self.n_models)):
            for ds in f[group].values():
                if ds.shape[0] != size:
                    ds.resize(size, axis=0)

    def _create(self, kernel: int) -> None:
        """Write an empty database for ``kernel`` atomically, then open it for appending."""
        from convforge.fileio import atomic_write

        h5py = _h5py()

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as f:
                self._skeleton(f, kernel)

        atomic_write(self.path, write)
        self._file = h5py.File(self.path, "a")

    @staticmethod
    def _skeleton(f: Any, kernel: int) -> None:
        taps = kernel * kernel
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["kernel"] = kernel
        f.create_dataset("filters", shape=(0, taps), maxshape=(None, taps), dtype=np.float32,
                         chunks=(CHUNK_ROWS, taps))
        f.create_dataset("filter_layer", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(CHUNK_ROWS,))
        for group, fields in (("layers", LAYER_FIELDS), ("models", MODEL_FIELDS)):
            g = f.create_group(group)
            for name, kind in fields.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_dtype(kind), chunks=(1024,))
        for key in ("n_filters", "n_layers", "n_models"):
            f.attrs[key] = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FilterDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ sizes

    @property
    def kernel(self) -> int | None:
        if self._file is None:
            return None
        k = self._file.attrs.get("kernel")
        return None if k is None else int(k)

    @property
    def n_filters(self) -> int:
        return 0 if self._file is None else int(self._file.attrs.get("n_filters", 0))

    @property
    def n_layers(self) -> int:
        return 0 if self._file is None else int(self._file.attrs.get("n_layers", 0))

    @property
    def n_models(self) -> int:
        return 0 if self._file is None else int(self._file.attrs.get("n_models", 0))

    def __len__(self) -> int:
        return self.n_filters

    # ------------------------------------------------------------ writing

    def append(self, filters: Filters, model_id: str, *, source: str = "", dataset: str = "", task: str = "",
               architecture: str = "", metrics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Append one model's filters (from ``extract_filters``) with its metadata; returns its model row.

        ``metrics``: the model's ``layer_metrics`` rows if already computed (else computed here).
        """
        if self.mode != "a":
            raise ConvforgeError(f"{self.path} was opened read-only")
        if not model_id:
            raise ConvforgeError("the model id must not be empty")
        if self._file is None:
            self._create(filters.kernel)
        elif self.kernel is None:  # an empty HDF5 file
            self._skeleton(self._file, filters.kernel)
        elif self.kernel != filters.kernel:
            raise ConvforgeError(f"{self.path} holds {self.kernel}x{self.kernel} filters, this model's are "
                                 f"{filters.kernel}x{filters.kernel}: use --kernel {self.kernel} or another --db file")
        if model_id in self.model_ids():
            raise ConvforgeError(f"model id {model_id!r} is already in {self.path}; pass --model-id with a new id")
        f = self._file
        n0, l0, m0 = self.n_filters, self.n_layers, self.n_models
        n = len(filters)
        f["filters"].resize(n0 + n, axis=0)
        f["filters"][n0:n0 + n] = filters.filters
        f["filter_layer"].resize(n0 + n, axis=0)
        f["filter_layer"][n0:n0 + n] = filters.layer.astype(np.int64) + l0
        rows: dict[str, list[Any]] = {name: [] for name in LAYER_FIELDS}
        start = n0
        import torch

        if metrics is not None and [r["name"] for r in metrics] != [info.name for info in filters.layers]:
            raise ValueError("metrics rows do not match the layers of filters")
        for index, info in enumerate(filters.layers):
            count = info.n_filters
            if metrics is not None:
                layer = metrics[index]
            else:
                block = filters.filters[start - n0:start - n0 + count]
                layer = weight_metrics(torch.from_numpy(block).reshape(
                    info.out_channels, info.in_channels // info.groups, filters.kernel, filters.kernel))
            row = {**info.as_dict(), **{k: layer[k] for k in (*METRIC_KEYS, "max_abs")},
                   "model": m0, "start": start, "count": count}
            for name in LAYER_FIELDS:
                rows[name].append(row[name])
            start += count
        self._extend("layers", rows, l0)
        model_row = {"id": model_id, "source": source, "dataset": dataset, "task": task,
                     "architecture": architecture, "n_layers": len(filters.layers), "n_filters": n,
                     "added": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._extend("models", {k: [v] for k, v in model_row.items()}, m0)
        f.flush()
        # commit: readers and later appends trust these counts only
        f.attrs["n_filters"] = n0 + n
        f.attrs["n_layers"] = l0 + len(filters.layers)
        f.attrs["n_models"] = m0 + 1
        f.flush()
        return {**model_row, "index": m0}

    def _extend(self, group: str, rows: dict[str, list[Any]], at: int) -> None:
        for name, values in rows.items():
            ds = self._file[group][name]
            ds.resize(at + len(values), axis=0)
            if values:
                ds[at:at + len(values)] = np.asarray(values, dtype=object if ds.dtype.kind == "O" else ds.dtype)

    # ------------------------------------------------------------ reading

    def _table(self, group: str, size: int) -> dict[str, np.ndarray]:
        if self._file is None or group not in self._file:
            return {}
        out = {}
        for name, ds in self._file[group].items():
            values = ds[:size]
            if ds.dtype.kind == "O":
                values = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values],
                                  dtype=object)
            out[name] = values
        return out

    def layers(self) -> dict[str, np.ndarray]:
        """The layer table: field name -> array with one entry per layer (small: read whole)."""
        return self._table("layers", self.n_layers)

    def models(self) -> list[dict[str, Any]]:
        table = self._table("models", self.n_models)
        return [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in table.items()}
                for i in range(self.n_models)]

    def model_ids(self) -> list[str]:
        if self._file is None or "models" not in self._file:
            return []
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in self._file["models"]["id"][:self.n_models]]

    def iter_chunks(self, chunk: int = READ_CHUNK, start: int = 0, stop: int | None = None
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (first row, filters (n, k^2), layer index (n,)) in chunks of at most ``chunk`` rows."""
        stop = self.n_filters if stop is None else min(stop, self.n_filters)
        for s in range(start, stop, chunk):
            e = min(s + chunk, stop)
            yield s, self._file["filters"][s:e], self._file["filter_layer"][s:e]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the filter array (loads them: mind the size)."""
        stop = self.n_filters if stop is None else min(stop, self.n_filters)
        return self._file["filters"][start:stop]

    def select(self, *, model: str | None = None, layer: str | None = None,
               depth: tuple[float, float] | None = None, dataset: str | None = None) -> np.ndarray:
        """The filters of the layers that match every given criterion (depth: lo <= d < hi, 1.0 included)."""
        table = self.layers()
        if not table:
            return np.zeros((0, (self.kernel or 3) ** 2), np.float32)
        keep = np.ones(self.n_layers, dtype=bool)
        if model is not None or dataset is not None:
            models = self.models()
            wanted = {i for i, m in enumerate(models)
                      if (model is None or m["id"] == model) and (dataset is None or m["dataset"] == dataset)}
            keep &= np.isin(table["model"], list(wanted))
        if layer is not None:
            keep &= table["name"] == layer
        if depth is not None:
            lo, hi = depth
            d = table["depth"]
            keep &= (d >= lo) & ((d < hi) | ((hi >= 1.0) & (d <= hi)))
        parts = [self.read(int(table["start"][i]), int(table["start"][i] + table["count"][i]))
                 for i in np.flatnonzero(keep)]
        return np.concatenate(parts) if parts else np.zeros((0, (self.kernel or 3) ** 2), np.float32)

    def groups(self, by: str = "model") -> dict[str, np.ndarray]:
        """Filters grouped by ``model``, ``dataset``, ``layer`` (model/layer) or ``depth`` (deciles of normalised depth)."""
        table = self.layers()
        if not table:
            return {}
        models = self.models()
        if by == "model":
            keys = [models[m]["id"] for m in table["model"]]
        elif by == "dataset":
            keys = [models[m]["dataset"] or "(unknown)" for m in table["model"]]
        elif by == "layer":
            keys = [f"{models[m]['id']}/{name}" for m, name in zip(table["model"], table["name"])]
        elif by in ("depth", "depth_decile"):
            keys = [f"depth {min(int(d * 10), 9) / 10:.1f}-{min(int(d * 10), 9) / 10 + 0.1:.1f}" for d in table["depth"]]
        else:
            raise ConvforgeError(f"cannot group filters by {by!r}: use model, dataset, layer or depth")
        grouped: dict[str, list[np.ndarray]] = {}
        for i, key in enumerate(keys):
            start, count = int(table["start"][i]), int(table["count"][i])
            grouped.setdefault(key, []).append(self.read(start, start + count))
        return {k: np.concatenate(v) for k, v in sorted(grouped.items())}

    def summary(self, chunk: int = READ_CHUNK) -> dict[str, Any]:
        """Counts per model and per depth decile, sparse share, per-tap mean and std and the PCA of the
        normalised filters, computed chunk by chunk (memory bounded by ``chunk`` rows: about
        ``chunk`` x k^2 x 24 bytes of temporaries)."""
        import torch

        from convforge.inspect.shift import normalise, pca_from_moments

        table = self.layers()
        models = self.models()
        k = self.kernel
        out: dict[str, Any] = {"path": str(self.path), "kernel": k, "n_filters": self.n_filters,
                               "n_layers": self.n_layers, "n_models": self.n_models, "models": models}
        if not self.n_filters:
            return out
        taps = k * k
        threshold = (0.01 * table["max_abs"]).astype(np.float32)
        threshold[threshold == 0] = 1.0
        total = torch.zeros(taps, dtype=torch.float64)
        scatter = torch.zeros(taps, taps, dtype=torch.float64)
        raw_sum = np.zeros(taps, np.float64)
        raw_sq = np.zeros(taps, np.float64)
        sparse = 0
        deciles = np.zeros(10, np.int64)
        for _, block, owner in self.iter_chunks(chunk):
            t = torch.from_numpy(block)
            low, high = torch.aminmax(t, dim=1)
            sparse += int((torch.maximum(high, low.neg_()).numpy() < threshold[owner]).sum())
            raw_sum += t.sum(dim=0, dtype=torch.float64).numpy()
            raw_sq += (t * t).sum(dim=0, dtype=torch.float64).numpy()
            x = normalise(t).to(torch.float64)
            total += x.sum(dim=0)
            scatter += x.T @ x
            del t, x
            deciles += np.bincount(np.minimum((table["depth"][owner] * 10).astype(np.int64), 9), minlength=10)
        n = self.n_filters
        pca = pca_from_moments(n, total, scatter)
        mean = raw_sum / n
        out.update({
            "sparse_share": sparse / n,
            "tap_mean": mean.tolist(),
            "tap_std": np.sqrt(np.maximum(raw_sq / n - mean ** 2, 0.0)).tolist(),
            "pca_explained_variance_ratio": pca.explained_variance_ratio.tolist(),
            "filters_per_depth_decile": deciles.tolist(),
            "per_model": [
                {"id": m["id"], "layers": int((table["model"] == i).sum()), "filters": int(m["n_filters"]),
                 **{key: float(np.average(table[key][table["model"] == i], weights=table["count"][table["model"] == i]))
                    for key in ("sparsity", "variance_entropy_clean_norm", "orthogonality")}}
                for i, m in enumerate(models) if (table["model"] == i).any()],
        })
        return out
