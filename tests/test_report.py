"""convforge report: a self-contained HTML report from real short training runs, opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from convforge import TrainConfig, fit
from convforge.cli import main
from convforge.report import render_report, write_report
from convforge.report.collect import classify, collect_run, table_rows
from convforge.report.plots import pareto_front
from helpers import headless_chromium

DATA = "synthetic:classes=3,size=8,train=64,test=32"


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real short runs; the first also holds bench, prune, quantize and filter outputs plus junk files."""
    root = tmp_path_factory.mktemp("report")
    a, b = root / "small", root / "narrow"
    fit(TrainConfig(data=DATA, epochs=2, batch_size=8, out=str(a)), quiet=True)
    fit(TrainConfig(data=DATA, epochs=2, batch_size=8, out=str(b), model_args={"widths": [8, 16]}), quiet=True)

    from convforge.compress.pipeline import prune_checkpoint
    from convforge.export import benchmark
    from convforge.train import load_checkpoint

    ckpt = load_checkpoint(a)
    bench = benchmark(ckpt.model, ckpt.input_size, [1, 4], ["torch"], warmup=1, repeats=2)
    bench["target"] = str(a)
    (a / "bench.json").write_text(json.dumps(bench))
    pruned = prune_checkpoint(a, "l1-filter", target_macs=0.5, log=lambda _m: None)
    (a / "prune.json").write_text(json.dumps(pruned))
    (a / "quantize.json").write_text(json.dumps({  # the keys convforge quantize --json prints
        "onnx": "best-int8.onnx", "top1_fp32": 90.0, "top1_int8": 89.5, "top1_torch": 90.0, "bytes": 30_000,
        "fp32_bytes": 100_000, "images_per_s_batch256": {"torch eager fp32": 1000.0, "onnxruntime fp32": 2000.0,
                                                          "onnxruntime int8": 3000.0}}))
    (a / "junk.json").write_text("{not json")
    (a / "other.json").write_text(json.dumps({"something": "else"}))
    filters = a / "filters"
    filters.mkdir()
    (filters / "first_layer.png").write_bytes(_png(40, 30))
    (filters / "broken.png").write_bytes(b"not a png")
    (filters / "metrics.json").write_text(json.dumps({"layers": [
        {"name": "stem.conv", "depth": 0.0, "sparsity": 0.0, "orthogonality": 0.91, "flags": []},
        {"name": "stages.0.0.conv", "depth": 1.0, "sparsity": 0.25, "orthogonality": 0.85, "flags": ["sparse"]}],
        "warnings": ["layer stages.0.0.conv: mostly sparse"]}))
    return a, b


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_single_run_report_has_every_section(runs, tmp_path):
    a, _ = runs
    out = write_report([a], tmp_path / "r.html")
    page = out.read_text(encoding="utf-8")
    for heading in ("Learning curves", "confusion matrix and per-class accuracy", "Model summary",
                    "Benchmarks (convforge bench)", "Compression", "Filters", "Configuration and environment"):
        assert heading in page, heading
    assert "Most confidently wrong test images" in page or "classified every test image correctly" in page
    # self-contained: every picture is an embedded PNG, nothing refers to the network, no script
    sources = _images(page)
    assert len(sources) >= 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # what it read: per-stage rows, bench rows, pruned vs unpruned, int8 vs fp32, the filter table and warning
    assert "stages.0" in page and "SmallCNN" in page
    assert "onnxruntime" not in page.split("Benchmarks")[1].split("Compression")[0]  # only torch was benchmarked
    assert "l1-filter target MACs 0.5" in page and "unpruned (prune.json)" in page
    assert "ONNX Runtime int8 (quantize.json)" in page and "89.50%" in page
    assert "first_layer.png" in page and "broken.png" not in page
    assert "metrics.json: 2 rows" in page and "mostly sparse" in page
    assert "junk.json could not be read" in page and "other.json" not in page
    assert oct(out.stat().st_mode & 0o044) != "0o0"  # readable by others (not the 0600 of a temporary file)


def test_run_data_evaluation_matches_the_run(runs):
    a, _ = runs
    run = collect_run(a)
    ev = run.evaluation
    assert ev is not None and ev["images"] == 32 and len(ev["classes"]) == 3
    assert sum(map(sum, ev["confusion"])) == 32
    summary = json.loads((a / "summary.json").read_text())
    meta = json.loads((a / "best.json").read_text())
    assert ev["top1"] == pytest.approx(meta["metrics"]["test_top1"])  # the best checkpoint's own figure
    assert run.stages[-1]["params"] == summary["params"] and run.stages[-1]["macs"] == summary["macs"]
    assert sum(r["params"] for r in run.stages[:-1]) == summary["params"]
    confidences = [w["confidence"] for w in ev["wrong"]]
    assert confidences == sorted(confidences, reverse=True)
    assert all(w["true"] != w["pred"] for w in ev["wrong"])
    assert len(ev["wrong"]) == min(16, ev["wrong_total"]) == min(16, 32 - sum(ev["confusion"][i][i] for i in range(3)))
    assert run.latency() is not None and run.latency()[1].startswith("bench.json: torch batch 1")


def test_several_runs_compare_with_pareto_front(runs, tmp_path):
    a, b = runs
    code = main(["report", str(a), str(b), "--out", str(tmp_path / "both.html"), "--no-eval"])
    assert code == 0
    page = (tmp_path / "both.html").read_text(encoding="utf-8")
    assert "Comparison" in page and "Learning curves, overlaid" in page and "Accuracy against latency" in page
    assert "Pareto front" in page
    # only one run has a bench file, so latency comes from training throughput for both, and the page says so
    assert "1000 / images_per_s of summary.json" in page
    assert 'href="#run-small"' in page and 'id="run-narrow"' in page


def test_same_names_get_told_apart(runs, tmp_path):
    a, _ = runs
    copy = tmp_path / "other" / a.name
    shutil.copytree(a, copy)
    page = render_report([a, copy], evaluate=False)
    assert f"other/{a.name}" in page


def test_cli_json_default_out_and_errors(runs, tmp_path, capsys):
    a, _ = runs
    assert main(["report", str(a), "--no-eval", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["report"] == str(a / "report.html") and (a / "report.html").is_file()
    (a / "report.html").unlink()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a convforge run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_unfinished_run_without_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0, "train_top1": 50.0, "lr": 0.1}\nnot json\n')
    page = render_report([run])
    assert "no summary.json" in page and "1 line(s) of metrics.jsonl" in page and "Learning curves" in page


def test_pareto_front_and_classify():
    points = [(1.0, 70.0), (2.0, 80.0), (2.5, 75.0), (3.0, 80.0), (4.0, 90.0), (0.5, 60.0)]
    assert pareto_front(points) == [5, 0, 1, 4]
    assert classify({"rows": [{"backend": "torch", "batch": 1}]}) == "bench"
    assert classify({"method": "l1-filter", "macs_before": 2, "macs_after": 1}) == "prune"
    assert classify({"top1_int8": 1.0}) == "quantize"
    assert classify({"onnx": "x.onnx", "max_abs_diff": 1e-6}) == "export"
    assert classify({"rows": []}) is None and classify([1, 2]) is None
    assert table_rows({"a": {"x": 1}, "b": {"x": 2}}) == [{"name": "a", "x": 1}, {"name": "b", "x": 2}]
    assert table_rows({"layers": [{"n": 1, "deep": {"no": 1}}]}) == [{"n": 1}]


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from convforge.report.tensorboard import TensorboardLogger

    logger = TensorboardLogger(tmp_path)
    logger.log_epoch(1, {"epoch": 1, "train_loss": 1.5, "test_top1": 40.0, "lr": 0.1, "note": "text", "x": float("nan")})
    logger.log_epoch(2, {"epoch": 2, "train_loss": 0.5, "test_top1": 60.0, "lr": 0.05, "custom": 3})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "top1/test", "lr", "other/custom"} <= tags and "other/x" not in tags
    assert [(e.step, e.value) for e in events.Scalars("loss/train")] == [(1, 1.5), (2, 0.5)]


# ---------------------------------------------------------------- a real browser


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def test_report_in_headless_chromium(runs, tmp_path):
    a, b = runs
    single = write_report([a], tmp_path / "single.html")
    both = write_report([a, b], tmp_path / "both.html")
    driver = headless_chromium()
    try:
        # the console check itself works: a page with an error is caught
        bad = tmp_path / "bad.html"
        bad.write_text("<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>"
                       "<script>console.error('broken')</script></body></html>")
        driver.get(bad.as_uri())
        assert any("broken" in entry["message"] for entry in _severe(driver))

        for page in (single, both):
            for width in (1280, 1024):
                driver.set_window_size(width, 900)
                driver.get(page.as_uri())
                assert driver.execute_script("return document.readyState") == "complete"
                images = driver.execute_script(
                    "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
                assert len(images) >= 4
                assert all(complete and natural > 0 for _, complete, natural in images), images
                # readable on a laptop: no horizontal scrolling of the page
                scroll, client = driver.execute_script(
                    "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
                assert scroll <= client, (page.name, width, scroll, client)
                assert _severe(driver) == []
            shot = tmp_path / f"{page.stem}.png"
            assert driver.save_screenshot(str(shot))
            assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    finally:
        driver.quit()
