"""The report's robustness and saliency sections, from real `convforge robust` and `convforge explain` outputs."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from convforge.cli import main
from convforge.measure.autoattack import AutoAttackCounts
from convforge.report import render_report, write_report
from convforge.report.plots import accuracy_eps
from convforge.robust import evaluate_robustness
from convforge.train.inference import load_model
from helpers import save_image

PNG = b"\x89PNG\r\n\x1a\n"
FAST_AA = AutoAttackCounts(apgd_steps=5, apgdt_steps=5, apgdt_targets=2, fab_steps=5, fab_targets=2,
                           square_queries=20)
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # two shared cores


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A small CNN trained 2 epochs on digits, with robust/ (FGSM, PGD, AutoAttack at two eps, two corruptions
    against a baseline) and explain/ (all methods on one test image) as the commands write them."""
    from convforge import TrainConfig, fit
    from convforge.data import load

    root = tmp_path_factory.mktemp("report-robust")
    path = root / "run"
    fit(TrainConfig(model="smallcnn", data="digits", epochs=2, batch_size=64, threads=1,
                    model_args={"widths": [8, 16, 32]}, out=str(path)), quiet=True)
    loaded = load_model(path)
    result = evaluate_robustness(loaded, "digits", attacks=("fgsm", "pgd", "autoattack"), eps=("4/255", "16/255"),
                                 samples=24, steps=3, batch_size=24, out_dir=path / "robust", progress=False,
                                 autoattack_counts=FAST_AA, corruptions="gaussian_noise,fog", severities=(1, 3),
                                 baseline=loaded)
    image = save_image(root / "seven <b>.png", load("digits").test.images[0][0].numpy())
    assert main(["explain", str(path), str(image), "--out", str(path / "explain"), "--threads", "1", "--json"]) == 0
    return {"path": path, "robust": result, "explain": json.loads((path / "explain" / "explain.json").read_text())}


def _bare_copy(run_path: Path, target: Path) -> Path:
    """The run directory without any robust or explain output."""
    target.mkdir()
    for name in RUN_FILES:
        shutil.copy(run_path / name, target / name)
    return target


def _rows(page: str) -> list[tuple[str, ...]]:
    """Every table row of the page as its cells' plain text."""
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S)
        rows.append(tuple(html.unescape(re.sub(r"<[^>]+>", "", c)) for c in cells))
    return rows


def _pictures(page: str) -> dict[str, bytes]:
    """Embedded pictures by alt text, decoded."""
    found = re.findall(r'<img src="data:image/png;base64,([^"]*)" alt="([^"]*)"', page)
    return {html.unescape(alt): base64.b64decode(data) for data, alt in found}


def _section(page: str, heading: str) -> str:
    return page.split(f"<h3>{heading}</h3>", 1)[1].split("<h3>", 1)[0]


def test_robustness_section_shows_the_real_numbers(run):
    page = render_report([run["path"]], evaluate=False)
    section = _section(page, "Robustness (convforge robust)")
    result = run["robust"]
    rows = _rows(section)
    clean = result["clean"]
    assert ("clean (no attack)", "0", f"{clean['accuracy']:.2f}%", f"{clean['correct']}/24", "-", "-") in rows
    for row in result["results"]:
        cells = (row["attack"], row["eps_text"], f"{row['robust_accuracy']:.2f}%", f"{row['robust']}/24")
        assert any(r[:4] == cells for r in rows), cells
    assert sum(1 for r in rows if r[0] == "autoattack" and "reduced counts: apgd steps 5" in r[4]) == 2
    assert any(r[0] == "pgd" and r[4].startswith("3 steps") for r in rows)
    # AutoAttack: one row per eps with the accuracy after each stage
    assert ("attack", "eps", "clean", "after apgd-ce", "after apgd-t", "after fab-t", "after square") in rows
    for row in (r for r in result["results"] if r["attack"] == "autoattack"):
        stages = tuple(f"{s['robust_accuracy']:.2f}%" for s in row["stages"])
        assert ("autoattack", row["eps_text"], f"{clean['accuracy']:.2f}%", *stages) in rows
    # corruptions: corruption x severity with the mean, CE against the baseline, and the mCE line
    corruption = result["corruption"]
    for mean in corruption["per_corruption"]:
        accuracy = {r["severity"]: r["accuracy"] for r in corruption["rows"] if r["corruption"] == mean["corruption"]}
        ce = "-" if mean["ce"] is None else f"{mean['ce']:.2f}%"
        assert (mean["corruption"], f"{accuracy[1]:.2f}%", f"{accuracy[3]:.2f}%", f"{mean['accuracy']:.2f}%", ce) \
            == _find(rows, mean["corruption"])[:5]
    assert f"Mean corruption accuracy {corruption['mean_accuracy']:.2f}%" in section
    assert f"mCE {corruption['mce']:.2f}%" in section
    # the curve and the heat map, embedded byte for byte from robust/
    pictures = _pictures(section)
    assert pictures["robust accuracy against eps"] == (run["path"] / "robust" / "robust-curve.png").read_bytes()
    assert pictures["accuracy per corruption and severity"].startswith(PNG)
    assert "24 images of its 360 of the test split of digits, drawn with seed 0" in section
    assert "<script" not in page and "http://" not in page and "https://" not in page


def _find(rows: list[tuple[str, ...]], first: str) -> tuple[str, ...]:
    return next(r for r in rows if r and r[0] == first)


def test_explanations_section_embeds_each_grid_with_its_prediction(run):
    page = render_report([run["path"]], evaluate=False)
    section = _section(page, "Saliency maps (convforge explain)")
    record = run["explain"]["explanations"][0]
    assert "methods gradcam, gradcam++, fullgrad, ig, occlusion" in section
    assert f"Grad-CAM layer {run['explain']['layer']}" in section
    caption = html.unescape(re.sub(r"<[^>]+>", "", section.split("<figcaption>", 1)[1].split("</figcaption>")[0]))
    assert caption == f"seven <b>.png: predicted {record['class']} {100 * record['probability']:.2f}%"
    assert "seven <b>" not in section  # the file name is escaped
    (alt, grid), = _pictures(section).items()
    assert grid == (run["path"] / "explain" / record["grid"]).read_bytes() and grid.startswith(PNG)
    assert "gradcam++" in alt and "left out" not in section


def test_sections_are_absent_without_their_files(run, tmp_path):
    page = render_report([_bare_copy(run["path"], tmp_path / "bare")], evaluate=False)
    assert "Robustness" not in page and "Saliency" not in page and "robust.json" not in page


def test_outputs_in_the_run_directory_itself_and_fallbacks(run, tmp_path):
    """robust.json and explain.json directly in RUN; no curve PNG (drawn by the report); no grids (overlays);
    more images than shown."""
    bare = _bare_copy(run["path"], tmp_path / "flat")
    shutil.copy(run["path"] / "robust" / "robust.json", bare / "robust.json")
    record = run["explain"]["explanations"][0]
    for method, name in record["files"].items():
        shutil.copy(run["path"] / "explain" / name, bare / name)
    records = [{**record, "image": f"img{i}.png", "grid": "missing.grid.png"} for i in range(11)]
    (bare / "explain.json").write_text(json.dumps({**run["explain"], "explanations": records}))
    page = write_report([bare], tmp_path / "flat.html", evaluate=False).read_text(encoding="utf-8")
    pictures = _pictures(_section(page, "Robustness (convforge robust)"))
    assert pictures["robust accuracy against eps"].startswith(PNG)  # drawn here: robust-curve.png is elsewhere
    assert pictures["robust accuracy against eps"] != (run["path"] / "robust" / "robust-curve.png").read_bytes()
    section = _section(page, "Saliency maps (convforge explain)")
    overlays = _pictures(section)
    assert len(overlays) == 8 * len(record["files"])
    assert overlays["gradcam overlay of img0.png"] == (bare / record["files"]["gradcam"]).read_bytes()
    assert "The first 8 of 11 images are shown; 3 more are left out" in section
    assert "robust.json could not be read" not in page  # not mistaken for a bench/prune file


def test_malformed_files_leave_a_note_and_the_rest_of_the_report(run, tmp_path):
    bare = _bare_copy(run["path"], tmp_path / "broken")
    (bare / "robust").mkdir()
    (bare / "robust" / "robust.json").write_text('{"clean": {"accuracy": 9')
    (bare / "robust.json").write_text(json.dumps({  # partial, wrong types and hostile text
        "model": "<script>alert(1)</script>", "clean": {"accuracy": "high"}, "norm": "linf",
        "results": [{"attack": "<img src=x onerror=alert(1)>", "eps": "big", "stages": "none"}, 3, None],
        "corruption": {"rows": [{"corruption": "fog", "severity": 1, "accuracy": 50.0}, "x"],
                       "per_corruption": None, "mce": None}}))
    (bare / "explain").mkdir()
    (bare / "explain" / "explain.json").write_text(json.dumps({"methods": "gradcam", "explanations": [
        {"image": "../../etc/passwd", "class": "<b>cat</b>", "probability": "x", "grid": "../../best.safetensors"},
        7]}))
    (bare / "explain.json").write_text("[1, 2]")
    page = render_report([bare], evaluate=False)
    assert "Configuration and environment" in page and "Learning curves" in page
    robust = _section(page, "Robustness (convforge robust)")
    assert "robust/robust.json could not be read (JSONDecodeError); left out" in robust
    assert "<script" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)" in robust
    rows = _rows(robust)
    assert _find(rows, "<img src=x onerror=alert(1)>") == ("<img src=x onerror=alert(1)>", "big", "-", "-", "-", "-")
    assert _find(rows, "clean (no attack)")[2] == "high" and _find(rows, "fog") == ("fog", "50.00%", "-", "-", "-")
    assert "These numbers hold for the evaluated subset only: the images of the ? split" in robust
    assert "Mean corruption accuracy -; against the baseline" in robust
    saliency = _section(page, "Saliency maps (convforge explain)")
    assert "&lt;b&gt;cat&lt;/b&gt;" in saliency and "no picture of passwd found" in saliency
    assert "explain.json is not a convforge explain result (no JSON object); left out" in saliency
    assert "<img" not in saliency  # nothing outside the explain folder, nothing that is not a PNG


def test_accuracy_eps_plot():
    assert accuracy_eps({}, 90.0, "none") is None
    assert accuracy_eps({"pgd": [(8 / 255, 40.0), (4 / 255, 60.0)]}, 90.0, "pgd").startswith(PNG)


def test_sections_in_headless_chromium(run, tmp_path):
    from helpers import headless_chromium
    from test_report import _severe

    page = write_report([run["path"]], tmp_path / "robust.html", evaluate=False)
    driver = headless_chromium()
    try:
        driver.set_window_size(1024, 900)
        driver.get(page.as_uri())
        headings = driver.execute_script("return Array.from(document.querySelectorAll('h3')).map(h => h.textContent)")
        assert "Robustness (convforge robust)" in headings and "Saliency maps (convforge explain)" in headings
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(images) == 4 and all(complete and width > 0 for _, complete, width in images), images
        scroll, client = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert scroll <= client and _severe(driver) == []
    finally:
        driver.quit()
