"""benchmarks/gpu_parity.py --smoke on the CPU: convforge's recipe runs, airbench's tensors are convforge's
pixels in airbench's layout, and airbench94 is skipped with the reason when CUDA or the package is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from convforge.data import load

DATA = "synthetic:classes=10,size=32,train=64,test=32"


def _bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_parity_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_parity_smoke_runs_convforge_and_converts_the_data_for_airbench(tmp_path):
    bench = _bench()
    result = bench.main(["--smoke", "--no-record", "--data", DATA, "--work", str(tmp_path)])
    ours = result["convforge"]
    records = [json.loads(line) for line in (Path(ours["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert ours["epochs"] == 1 and len(ours["curve"]) == 1
    epoch, seconds, top1 = ours["curve"][0]
    assert (epoch, top1) == (1, records[0]["test_top1"]) and seconds == records[0]["train_time_s"]
    assert ours["reached"]["94"] == (seconds if top1 >= 94 else None)
    # airbench's CifarLoader files hold convforge's decoded pixels, channels last
    data = load(DATA)
    for split in ("train", "test"):
        saved = torch.load(result["files"][split], weights_only=True)
        part = data.split(split)
        assert saved["images"].dtype == torch.uint8 and saved["images"].shape[1:] == (32, 32, 3)
        assert torch.equal(saved["images"], torch.as_tensor(part.images).permute(0, 2, 3, 1))
        assert torch.equal(saved["labels"], torch.as_tensor(part.labels, dtype=torch.int64))
        assert saved["classes"] == list(data.classes)
    if not torch.cuda.is_available():
        assert result["airbench"]["status"] == "skipped"
        assert result["airbench"]["reason"].startswith("airbench94 skipped: no CUDA device")
    assert json.loads((tmp_path / "parity.json").read_text())["convforge"]["final_top1"] == ours["final_top1"]


def test_first_time_at_a_target():
    bench = _bench()
    curve = [(1, 10.0, 80.0), (2, 20.0, 93.5), (3, 30.0, 94.2)]
    assert bench.first_at(curve, 93.0) == 20.0 and bench.first_at(curve, 94.0) == 30.0
    assert bench.first_at(curve, 95.0) is None
