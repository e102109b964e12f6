"""Training options that hand each epoch to other parts of convforge: filter health, report, TensorBoard."""

from __future__ import annotations

from convforge import TrainConfig, fit
from helpers import TINY_SYNTH, read_jsonl


def test_filter_health_report_and_tensorboard_from_train(tmp_path):
    run = tmp_path / "run"
    summary = fit(TrainConfig(data=TINY_SYNTH, epochs=2, batch_size=8, threads=1, out=str(run),
                                filter_health=True, report=True, tensorboard=True), quiet=True)
    records = read_jsonl(run / "metrics.jsonl")
    for record in records:
        health = record["filter_health"]
        assert health["summary"]["layers"] == len(health["layers"]) > 0
        for layer in health["layers"].values():
            assert 0.0 <= layer["sparsity"] <= 1.0 and isinstance(layer["flags"], list)
    # freshly initialised 3x3 filters are near-random already: that is the baseline, not a warning
    assert any("near_random" in layer["flags"] for layer in records[0]["filter_health"]["layers"].values())
    assert "near-random" not in (run / "train.log").read_text()
    report = run / "report.html"
    assert summary["report"] == str(report) and report.stat().st_size > 10_000
    assert "<img" in report.read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
