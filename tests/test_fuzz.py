"""Fuzz tests (hypothesis): hostile input to the data loaders, the config parser and the checkpoint reader
gives a result or convforge's own clear error (DataError, ConfigError, CheckpointError), never any other
exception.

Bounded in time for CI: a fixed number of examples per test, derandomized (the same examples on every
run, so a failure reproduces), no example database written. Set CONVFORGE_FUZZ_SCALE=10 to run ten
times as many examples, and CONVFORGE_FUZZ_RANDOM=1 for new random ones on each run.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import yaml
from helpers import write_cifar10_batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import convforge
from convforge import TrainConfig, load_checkpoint
from convforge.config import coerce_fields, dump_yaml, load_yaml
from convforge.data import load
from convforge.data.dataset import Dataset
from convforge.data.imagefolder import decode_image
from convforge.data.sources import read_idx
from convforge.errors import CheckpointError, ConfigError, ConvforgeError, DataError
from convforge.train import read_checkpoint_meta, save_checkpoint
from convforge.train.checkpoint import validate_meta

SCALE = float(os.environ.get("CONVFORGE_FUZZ_SCALE", "1"))
# CONVFORGE_FUZZ_RANDOM=1 draws new examples on every run (to hunt for bugs) instead of the fixed ones.
RANDOM = os.environ.get("CONVFORGE_FUZZ_RANDOM") == "1"


def fuzz(examples: int):
    """Hypothesis settings for one fuzz test: ``examples`` cases (times CONVFORGE_FUZZ_SCALE), reproducible."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------- byte mutations

# (position, value) writes, deletions, insertions and a truncation, applied to a valid file.
_edits = st.lists(
    st.tuples(st.sampled_from(["set", "xor", "delete", "insert", "dup"]), st.integers(0, 1 << 20), st.integers(0, 255)),
    min_size=1, max_size=6,
)


def mutate(data: bytes, edits, cut: int | None) -> bytes:
    out = bytearray(data)
    for op, position, value in edits:
        if not out:
            out.append(value)
            continue
        i = position % len(out)
        if op == "set":
            out[i] = value
        elif op == "xor":
            out[i] ^= 1 << (value % 8)
        elif op == "delete":
            del out[i:i + 1 + value % 16]
        elif op == "insert":
            out[i:i] = bytes([value]) * (1 + value % 8)
        else:  # duplicate a stretch (a repeated chunk, a doubled header)
            out[i:i] = out[i:i + 1 + value % 64]
    if cut is not None and out:
        del out[cut % len(out):]
    return bytes(out)


_cuts = st.one_of(st.none(), st.integers(0, 1 << 20))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- images


def _image_bytes(mode: str, fmt: str, size=(6, 5), **options) -> bytes:
    rng = np.random.default_rng(len(mode) * 31 + len(fmt))
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    img = rgb.quantize(8) if mode == "P" else rgb.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


VALID_IMAGES = [
    _image_bytes("RGB", "PNG"), _image_bytes("RGBA", "PNG"), _image_bytes("P", "PNG"), _image_bytes("L", "PNG"),
    _image_bytes("LA", "PNG"), _image_bytes("1", "PNG"), _image_bytes("I;16", "PNG"),
    _image_bytes("RGB", "JPEG"), _image_bytes("L", "JPEG"), _image_bytes("CMYK", "JPEG"),
    _image_bytes("RGB", "JPEG", progressive=True), _image_bytes("RGB", "BMP"), _image_bytes("P", "BMP"),
    _image_bytes("P", "GIF"), _image_bytes("RGB", "WEBP"), _image_bytes("RGB", "TIFF"),
]


def _check_decoded(path, size):
    try:
        array = decode_image(str(path), size)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] in (1, 3)
    if size is not None:
        assert array.shape[:2] == size


@fuzz(150)
@given(data=st.binary(max_size=3000), size=st.sampled_from([None, (8, 8), (3, 5)]))
def test_random_bytes_decode_or_data_error(workdir, data, size):
    path = workdir / "random.png"
    path.write_bytes(data)
    _check_decoded(path, size)


@fuzz(400)
@given(base=st.sampled_from(VALID_IMAGES), edits=_edits, cut=_cuts, size=st.sampled_from([None, (8, 8)]),
       suffix=st.sampled_from([".png", ".jpg", ".bmp", ".webp"]))
def test_mutated_images_decode_or_data_error(workdir, base, edits, cut, size, suffix):
    path = workdir / f"mutated{suffix}"
    path.write_bytes(mutate(base, edits, cut))
    _check_decoded(path, size)


# ---------------------------------------------------------------- MNIST IDX and CIFAR batches


def _idx_bytes(array: np.ndarray, gz: bool) -> bytes:
    raw = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    return gzip.compress(raw, mtime=0) if gz else raw


_rng = np.random.default_rng(0)
IDX_FILES = {
    "images": _rng.integers(0, 256, (3, 4, 5), dtype=np.uint8),
    "labels": _rng.integers(0, 10, (3,), dtype=np.uint8),
}


@fuzz(250)
@given(which=st.sampled_from(sorted(IDX_FILES)), gz=st.booleans(), edits=_edits, cut=_cuts)
def test_mutated_idx_files_read_or_data_error(workdir, which, gz, edits, cut):
    path = workdir / ("file-idx.gz" if gz else "file-idx")
    data = mutate(_idx_bytes(IDX_FILES[which], gz), edits, cut)
    path.write_bytes(data)
    try:
        array = read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert array.dtype == np.uint8
    # a file that reads must be exactly its header's size (a gzip file's CRC is checked too)
    raw = gzip.decompress(data) if gz else data
    assert len(raw) == 4 + 4 * array.ndim + array.size


@fuzz(60)
@given(which=st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]),
       dims=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=4), extra=st.integers(-3, 3))
def test_idx_headers_with_any_dimensions(workdir, which, dims, extra):
    """Header dimensions up to 2^32-1 (products far beyond int64) never allocate or overflow."""
    root = workdir / "mnist-dims"
    if not root.exists():
        from helpers import write_mnist_idx

        write_mnist_idx(root, train=3, test=2)
    body = bytes(max(0, min(64, (math.prod(dims) if dims else 0) + extra)))
    (root / which).write_bytes(struct.pack(">I", 0x800 | len(dims)) + struct.pack(f">{len(dims)}I", *dims) + body)
    try:
        dataset = load(f"mnist:{root}")
    except DataError:
        return
    assert isinstance(dataset, Dataset)


@pytest.fixture(scope="module")
def cifar_dir(workdir):
    root = workdir / "cifar"
    write_cifar10_batches(root, per_batch=2, test=2)
    return root


def _batch_pickle(protocol: int) -> bytes:
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    return pickle.dumps({b"batch_label": b"x", b"data": rows, b"labels": [1, 2]}, protocol=protocol)


CIFAR_BASES = [_batch_pickle(2), _batch_pickle(4), pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2)]


@fuzz(150)
@given(base=st.sampled_from(CIFAR_BASES), edits=_edits, cut=_cuts,
       target=st.sampled_from(["data_batch_1", "test_batch", "batches.meta"]))
def test_mutated_cifar_batches_load_or_data_error(cifar_dir, base, edits, cut, target):
    path = cifar_dir / target
    original = path.read_bytes()
    path.write_bytes(mutate(base, edits, cut))
    try:
        dataset = load(f"cifar10:{cifar_dir}")
    except DataError as exc:
        assert "cifar" in str(exc)
    else:
        assert dataset.channels == 3 and dataset.image_size == (32, 32)
        assert int(dataset.train.labels.max()) < dataset.num_classes
        assert all(isinstance(c, str) for c in dataset.classes)
    finally:
        path.write_bytes(original)


_plain = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                   st.binary(max_size=8))


@fuzz(120)
@given(data=st.dictionaries(st.sampled_from([b"data", b"labels", "data", "labels", b"x"]),
                            st.one_of(_plain, st.lists(_plain, max_size=4),
                                      st.lists(st.lists(st.integers(0, 255), max_size=4), max_size=3)),
                            max_size=3),
       names=st.one_of(st.none(), _plain, st.lists(_plain, max_size=12)))
def test_cifar_batches_with_any_content(cifar_dir, data, names):
    """Well-formed pickles holding the wrong things: ragged lists, strings, huge ints, bad label names."""
    saved = {name: (cifar_dir / name).read_bytes() for name in ("data_batch_2", "batches.meta")}
    (cifar_dir / "data_batch_2").write_bytes(pickle.dumps(data, protocol=2))
    (cifar_dir / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    try:
        load(f"cifar10:{cifar_dir}")
    except DataError:
        pass
    finally:
        for name, content in saved.items():
            (cifar_dir / name).write_bytes(content)


# ---------------------------------------------------------------- data specs


@pytest.fixture(scope="module")
def spec_dirs(workdir):
    from helpers import make_image_folder, write_mnist_idx

    dirs = {"mnist": workdir / "spec-mnist", "folder": workdir / "spec-folder", "empty": workdir / "spec-empty"}
    write_mnist_idx(dirs["mnist"], train=3, test=2)
    make_image_folder(dirs["folder"], {"train": 1, "test": 1}, classes=("a", "b"))
    dirs["empty"].mkdir()
    (workdir / "spec-file.txt").write_text("x")
    dirs["file"] = workdir / "spec-file.txt"
    return dirs


_small_number = st.one_of(st.integers(-3, 24).map(str), st.sampled_from(["", "1e3", "0x10", " 7 ", "1_0", "١٢",
                                                                          str(2**64), "-0", "nan"]))
_synthetic_items = st.lists(
    st.tuples(st.sampled_from(["classes", "size", "channels", "train", "test", "seed", "colour", "", " size"]),
              st.sampled_from(["=", "", "=="]), _small_number).map("".join),
    max_size=4,
).map(",".join)


@fuzz(150)
@given(data=st.data())
def test_random_data_specs_load_or_convforge_error(spec_dirs, data):
    kind = data.draw(st.sampled_from(["digits", "synthetic", "mnist", "cifar10", "imagefolder", "DIGITS", " mnist",
                                      "foo", "", "imagefolder:imagefolder"]), label="kind")
    if kind == "synthetic":
        arg = data.draw(_synthetic_items, label="options")
    elif kind == "digits":
        arg = data.draw(st.sampled_from(["", "x"]), label="arg")
    else:
        names = [str(p) for p in spec_dirs.values()]
        arg = data.draw(st.one_of(
            st.sampled_from(names + ["", "~", "~no_such_user_zz/x", "/nonexistent/dir", "a\0b", "x" * 300 + "/y",
                                     "/" + "y" * 5000]),
            st.text(max_size=20),
        ), label="arg")
    sep = data.draw(st.sampled_from([":", "", "::"]), label="sep")
    spec = f"{kind}{sep}{arg}"
    image_size = data.draw(st.sampled_from([None, None, 8, 0, -1, (8, 8), (4, 0)]), label="image_size")
    try:
        dataset = load(spec, image_size=image_size)
    except ConvforgeError as exc:
        assert str(exc)
        return
    assert isinstance(dataset, Dataset) and len(dataset.test) > 0


@fuzz(100)
@given(spec=st.one_of(st.text(max_size=40), st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_arbitrary_spec_text_loads_or_convforge_error(spec):
    try:
        load(spec)
    except ConvforgeError:
        pass


# ---------------------------------------------------------------- config


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=10,
)
_any_value = st.one_of(
    _json_like,
    st.integers(-5, 100),
    st.floats(-2, 2),
    st.sampled_from(["sgd", "adamw", "cosine", "onecycle", "constant", "crop-flip", "none", "cpu", "cuda:0", "cuda:x",
                     "auto", "smallcnn", "digits", "", "\0"]),
    st.tuples(st.integers(), st.integers()),
    st.dates(),
    st.binary(max_size=4),
    st.sets(st.integers(), max_size=2),
)
_keys = st.one_of(st.sampled_from(sorted(FIELDS)), st.sampled_from(sorted(FIELDS)).map(lambda k: k.replace("_", "-")),
                  st.text(max_size=8), st.integers(), st.none())


def _check_config(values, source="fuzz"):
    try:
        cfg = TrainConfig.from_dict(values, source)
        cfg.validate()
    except ConfigError as exc:
        assert str(exc)
        return None
    # a valid config can be resolved, written and read back: resume depends on it
    resolved = cfg.resolved(3, (8, 8), "none")
    json.dumps(cfg.to_dict(), allow_nan=False)
    assert TrainConfig.from_dict(yaml.safe_load(dump_yaml(resolved))) == resolved
    return cfg


@fuzz(400)
@given(values=st.dictionaries(_keys, _any_value, max_size=6))
def test_random_config_dicts_give_config_or_config_error(values):
    _check_config(values)


@fuzz(60)
@given(values=st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.lists(_json_like, max_size=3)))
def test_non_mapping_configs(values):
    with pytest.raises(ConfigError, match="fuzz: expected a mapping"):
        coerce_fields(values, "fuzz")


YAML_SEEDS = [
    "epochs: 3\nlr: 0.1\nmodel_args: {widths: [4, 8]}\n",
    "epochs: 2024-13-45\n",
    "model_args: &a [*a]\n",
    "model_args: {when: 2024-01-02, raw: !!binary aGVsbG8=}\n",
    "lr: .nan\nweight_decay: .inf\n",
    "seed: 0x7fffffffffffffffffff\n",
    "!!python/object/apply:os.system ['touch /tmp/convforge-fuzz-pwned']\n",
    "epochs: !!python/name:os.system\n",
    "model_args: !!set {a, b}\n",
    "[" * 200 + "]" * 200,
    "? [a, b]\n: 1\n",
    "epochs: 1:30\n",
    "batch_size: 0b1010\ndevice: cuda:07\n",
    "%YAML 1.1\n---\nepochs: 2\n...\n---\nepochs: 3\n",
    "\ufeffepochs: 2\n",
]


@fuzz(250)
@given(seed=st.sampled_from(YAML_SEEDS), edits=_edits, cut=_cuts, raw=st.booleans())
def test_mutated_yaml_files_give_config_or_config_error(workdir, seed, edits, cut, raw):
    path = workdir / "config.yaml"
    path.write_bytes(mutate(seed.encode(), edits, cut) if raw else seed.encode())
    try:
        values = load_yaml(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    _check_config(values, str(path))
    assert not os.path.exists("/tmp/convforge-fuzz-pwned")


@fuzz(150)
@given(values=st.dictionaries(st.sampled_from(sorted(FIELDS)), _json_like, max_size=5))
def test_random_yaml_documents(workdir, values):
    path = workdir / "doc.yaml"
    try:
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
    except yaml.YAMLError:
        return
    try:
        _check_config(load_yaml(path), str(path))
    except ConfigError as exc:
        assert str(path) in str(exc)


# ---------------------------------------------------------------- checkpoints


def _valid_meta():
    return {"format": "convforge-checkpoint", "format_version": 1,
            "model": {"name": "smallcnn", "args": {"widths": [4, 8]}, "num_classes": 3, "in_chans": 1},
            "classes": ["a", "b", "c"], "input_size": [1, 8, 8],
            "normalization": {"mean": [0.5], "std": [0.25]},
            "data": {"spec": "digits", "train": 10, "test": 5}, "epoch": 1}


_PATHS = [("format",), ("format_version",), ("model",), ("model", "name"), ("model", "args"),
          ("model", "args", "widths"), ("model", "num_classes"), ("model", "in_chans"), ("classes",),
          ("input_size",), ("input_size", 0), ("input_size", 2), ("normalization",), ("normalization", "mean"),
          ("normalization", "std"), ("normalization", "std", 0), ("data",), ("data", "spec"), ("classes", 1)]
_meta_values = st.one_of(_json_like, st.integers(-2, 10), st.sampled_from(
    [float("nan"), float("inf"), True, False, 0, -1, 2**63, [1, 8, 8], [3, 8, 8], ["a", "b", "c"], [], {}, "smallcnn",
     "nosuch", "", [4], [4, 8, 16], {"widths": [4, 8]}, {"widths": [-1, 8]}, {"widths": "ab"}, {"bogus": 1},
     {"widths": [4, 8], "stem_pool": "yes"}, {"widths": []}]))


def _set_path(meta, path, value, delete):
    node = meta
    for key in path[:-1]:
        if isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int) and last < len(node)):
        if delete:
            if isinstance(node, dict):
                node.pop(last, None)
            else:
                del node[last]
        else:
            node[last] = value


_meta_changes = st.lists(st.tuples(st.sampled_from(_PATHS), _meta_values, st.booleans()), max_size=3)


def _changed_meta(changes):
    meta = _valid_meta()
    for path, value, delete in changes:
        _set_path(meta, path, value, delete)
    return meta


@fuzz(400)
@given(meta=st.one_of(_json_like, _meta_changes.map(_changed_meta)))
def test_random_sidecars_validate_or_checkpoint_error(meta):
    try:
        validate_meta(meta, "run/best.json")
    except CheckpointError as exc:
        assert "run/best.json" in str(exc)
        return
    # what the rest of convforge reads from a valid sidecar is usable
    assert len(meta["classes"]) == meta["model"]["num_classes"]
    assert meta["input_size"][0] == meta["model"]["in_chans"] == len(meta["normalization"]["mean"])
    assert all(math.isfinite(v) for v in meta["normalization"]["mean"] + meta["normalization"]["std"])
    assert isinstance(meta.get("data", {}).get("spec", ""), str)


@pytest.fixture(scope="module")
def checkpoint_blob(workdir):
    torch.manual_seed(0)
    model = convforge.create_model("smallcnn", num_classes=3, in_chans=1, widths=[4, 8])
    meta = {k: v for k, v in _valid_meta().items() if k not in ("format", "format_version")}
    path = save_checkpoint(workdir / "base.safetensors", model, meta)
    return path.read_bytes()


def _split(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _check_checkpoint(path):
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        meta = None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return
    assert meta is not None and ckpt.meta == meta
    with torch.no_grad():
        ckpt.model(torch.zeros(1, *ckpt.input_size))


@fuzz(150)
@given(changes=_meta_changes, text_edits=st.one_of(st.none(), _edits))
def test_mutated_checkpoint_metadata(workdir, checkpoint_blob, changes, text_edits):
    header, body = _split(checkpoint_blob)
    meta = json.loads(header["__metadata__"]["convforge"])
    for path, value, delete in changes:
        _set_path(meta, path, value, delete)
    text = json.dumps(meta)
    if text_edits is not None:
        text = mutate(text.encode(), text_edits, None).decode("utf-8", "replace")
    header["__metadata__"]["convforge"] = text
    path = workdir / "meta.safetensors"
    path.write_bytes(_join(header, body))
    _check_checkpoint(path)


@fuzz(150)
@given(how=st.sampled_from(["length", "truncate", "bytes", "header-key"]), number=st.integers(0, 2**64 - 1),
       edits=_edits, cut=st.integers(0, 1 << 16))
def test_mutated_safetensors_files(workdir, checkpoint_blob, how, number, edits, cut):
    blob = checkpoint_blob
    (length,) = struct.unpack("<Q", blob[:8])
    if how == "length":  # the header-length prefix: any 64-bit value, or off by a little
        value = number if number % 2 else max(0, length + (number % 33) - 16)
        blob = struct.pack("<Q", value) + blob[8:]
    elif how == "truncate":
        blob = blob[: cut % len(blob)]
    elif how == "bytes":  # flips anywhere in the prefix and the JSON header
        blob = mutate(blob[: 8 + length], edits, None) + blob[8 + length:]
    else:  # a tensor's entry: dtype, shape or offsets
        header, body = _split(blob)
        name = sorted(k for k in header if k != "__metadata__")[number % (len(header) - 1)]
        field = ["dtype", "shape", "data_offsets"][number % 3]
        header[name][field] = {"dtype": ["F16", "I64", "BOOL", "X"], "shape": [[], [10**12], [0], [2, 2]],
                               "data_offsets": [[0, 2**62], [4, 0], [0, 0]]}[field][number % 3]
        blob = _join(header, body)
    path = workdir / "file.safetensors"
    path.write_bytes(blob)
    _check_checkpoint(path)
