"""Real trained weights from another project (akamaster/pytorch_resnet_cifar10) on real CIFAR-10-JPEG images.

Needs ../shared (reference-weights/ and datasets/cifar10-jpeg.tar.gz); skipped when it is absent.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

import convforge
from convforge.measure import count_params
from convforge.models import load_foreign_weights
from convforge.models.weights import read_state_dict
from helpers import run_cli

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "reference-weights"
CIFAR_TAR = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
REFERENCE_FILES = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}
IMAGENET_MEAN = ("0.485", "0.456", "0.406")
IMAGENET_STD = ("0.229", "0.224", "0.225")

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent: no reference weights or datasets to test with"),
]


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent from the shared folder")
    return path


@pytest.fixture(scope="session")
def cifar10_jpeg_test(tmp_path_factory) -> Path:
    """Only the ``cifar10-jpeg/test/`` members of the archive, extracted into a temporary folder."""
    tar_path = _require(CIFAR_TAR)
    target = tmp_path_factory.mktemp("cifar10-jpeg-test")
    extracted = 0
    with tarfile.open(tar_path, "r|gz") as archive:
        for member in archive:
            if member.name.startswith("cifar10-jpeg/test/"):
                archive.extract(member, target, filter="data")
                extracted += member.isfile()
    assert extracted == 10_000
    return target / "cifar10-jpeg"


@pytest.mark.parametrize("name", sorted(REFERENCE_FILES))
def test_reference_files_load_into_our_resnets(name):
    path = _require(WEIGHTS / REFERENCE_FILES[name])
    model = convforge.create_model(name, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_foreign_weights(model, path)
    state = read_state_dict(path)
    assert not any(k.startswith("module.") for k in state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, state[key]), key
    assert not torch.equal(model.linear.weight, before["linear.weight"])
    assert count_params(model) == sum(v.numel() for k, v in state.items() if "running_" not in k
                                      and not k.endswith("num_batches_tracked"))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.slow
def test_resnet20_reference_accuracy_on_cifar10_jpeg(tmp_path, cifar10_jpeg_test):
    weights = _require(WEIGHTS / REFERENCE_FILES["resnet20"])
    assert sorted(p.name for p in (cifar10_jpeg_test / "test").iterdir()) == sorted(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    result = run_cli("eval", "--model", "resnet20", "--weights", weights, "--data", f"imagefolder:{cifar10_jpeg_test}",
                     "--mean", *IMAGENET_MEAN, "--std", *IMAGENET_STD, "--json", cwd=tmp_path, timeout=540)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 10_000 and report["split"] == "test"
    assert report["classes"][0] == "airplane" and len(report["per_class"]) == 10
    assert report["top1"] == pytest.approx(81.0, abs=0.1)
    assert report["top5"] > report["top1"]
    assert all(acc is not None and acc > 50 for acc in report["per_class"])
