"""The engine's dense tasks end to end: train, resume, checkpoint, eval, segment, upscale, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convforge import TrainConfig, fit
from convforge.errors import ConfigError, DataError
from convforge.train import load_checkpoint
from helpers import run_cli, save_image

CLASSES_TXT = "0 dark\n1 bright\n2 red\nignore: 255\n"


def _segfolder(root, size=(32, 40), counts=(("train", 8), ("test", 3))):
    """Masks that follow from the image: class 0 dark, 1 bright, 2 red pixels; a few ignored pixels."""
    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(CLASSES_TXT)
    for split, count in counts:
        for i in range(count):
            mask = rng.integers(0, 3, (size[0] // 4, size[1] // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
            image = np.zeros((*size, 3), np.uint8)
            image[mask == 0] = (20, 20, 20)
            image[mask == 1] = (230, 230, 230)
            image[mask == 2] = (220, 30, 30)
            image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
            mask[0, 0] = 255
            save_image(root / split / "images" / f"f{i}.png", image)
            save_image(root / split / "masks" / f"f{i}.png", mask)
    return root


def _srfolder(root):
    rng = np.random.default_rng(0)
    for i in range(3):
        low = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
        picture = Image.fromarray(low).resize((64, 64), Image.BICUBIC)
        save_image(root / "train-T91" / f"t{i}.png", np.asarray(picture))
    for i in range(2):
        low = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
        save_image(root / "Set5" / f"img{i}.png", np.asarray(Image.fromarray(low).resize((31, 25), Image.BICUBIC)))
    return root


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_segmentation_trains_resumes_and_is_used_by_every_command(tmp_path, one_thread):
    data = _segfolder(tmp_path / "seg")
    run = tmp_path / "run"
    config = TrainConfig(task="segment", model="unet", model_args={"base_width": 4}, data=f"segfolder:{data}",
                         epochs=1, batch_size=4, lr=0.05, augment="scale-crop-flip", seg_crop=[24, 32],
                         out=str(run))
    first = fit(config, quiet=True)
    assert first["task"] == "segment" and first["best_metric"] == "test_miou"
    resumed = fit(TrainConfig(resume=str(run), epochs=4), quiet=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert {"test_miou", "test_pixel_acc", "test_loss", "test_per_class_iou"} <= set(records[-1])
    assert "train_top1" not in records[-1]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert resumed["metrics"]["test_pixel_acc"] == pytest.approx(records[-1]["test_pixel_acc"])

    ckpt = load_checkpoint(run)
    assert ckpt.meta["task"] == "segment" and ckpt.meta["ignore_index"] == 255
    assert ckpt.classes == ["dark", "bright", "red"]
    assert ckpt.model(torch.zeros(1, 3, 23, 29)).shape == (1, 3, 23, 29)

    evaluated = run_cli("eval", run, "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)["test"]
    assert scores["miou"] == pytest.approx(records[-1]["test_miou"], abs=1e-6)

    image = tmp_path / "seg" / "test" / "images" / "f0.png"
    segmented = run_cli("segment", run, image, "--out", tmp_path / "mask.png", "--json", cwd=tmp_path)
    assert segmented.returncode == 0, segmented.stderr
    mask = Image.open(tmp_path / "mask.png")
    assert mask.mode == "P" and mask.size == (40, 32)
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    assert Image.open(tmp_path / "mask.overlay.png").size == (40, 32)
    assert abs(sum(json.loads(segmented.stdout)["class_shares"].values()) - 100.0) < 0.1

    wrong = run_cli("upscale", run, image, "--out", tmp_path / "x.png", cwd=tmp_path)
    assert wrong.returncode == 2 and "segment checkpoint" in wrong.stderr and "convforge segment" in wrong.stderr

    from convforge.report import write_report

    html = write_report([run], tmp_path / "report.html").read_text()
    assert "test mIoU" in html and "test top-1" not in html
    assert "evaluation on" not in html  # no failed (classification-style) evaluation note
    section = html.split("Segmentation: mIoU and per-class IoU")[1]
    evaluated_seg = json.loads(run_cli("eval", run, "--json", cwd=tmp_path).stdout)
    assert f"{evaluated_seg['test']['miou']:.2f}%" in section.split("</table>")[0]  # the same figure as eval
    assert section.count("ground truth") >= 2 and "data:image/png;base64" in section

    exported = run_cli("export", run / "last.safetensors", "--format", "onnx", "--out", tmp_path / "seg.onnx",
                       "--json", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["max_abs_diff"] <= 1e-4


def test_super_resolution_trains_and_upscales(tmp_path, one_thread):
    data = _srfolder(tmp_path / "sr")
    run = tmp_path / "run"
    summary = fit(TrainConfig(task="super-resolve", model="espcn", data=f"superres:{data}", scale=3, epochs=2,
                                batch_size=8, optimizer="adamw", lr=1e-3, out=str(run)), quiet=True)
    assert summary["best_metric"] == "Set5_psnr"
    metrics = summary["metrics"]
    assert {"Set5_psnr", "Set5_ssim", "Set5_bicubic_psnr"} <= set(metrics)
    assert 5.0 < metrics["Set5_psnr"] < 60.0 and 0.0 < metrics["Set5_ssim"] <= 1.0

    ckpt = load_checkpoint(run)
    assert ckpt.meta["task"] == "super-resolve" and ckpt.meta["scale"] == 3
    assert ckpt.meta["model"]["args"]["scale"] == 3 and ckpt.meta["input_size"] == [1, 16, 16]

    from convforge.report import write_report

    html = write_report([run], tmp_path / "report.html").read_text()
    assert "Set5 PSNR (dB)" in html and "evaluation on" not in html
    section = html.split("PSNR and SSIM against bicubic")[1]
    assert f"{metrics['Set5_psnr']:.2f}" in section.split("</table>")[0]  # the training run's own figure
    assert "Set5, first image: centre crop" in section and section.count("data:image/png;base64") >= 3

    image = data / "Set5" / "img0.png"
    upscaled = run_cli("upscale", run, image, "--out", tmp_path / "big.png", "--json", cwd=tmp_path)
    assert upscaled.returncode == 0, upscaled.stderr
    assert Image.open(tmp_path / "big.png").size == (93, 75)

    evaluated = run_cli("eval", run, "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["Set5"]["psnr"] == pytest.approx(metrics["Set5_psnr"], abs=1e-6)


def test_task_and_model_must_agree(tmp_path):
    data = _segfolder(tmp_path / "seg", counts=(("train", 4), ("test", 2)))
    with pytest.raises(ConfigError, match="classify model.*--task classify"):
        fit(TrainConfig(task="segment", model="smallcnn", data=f"segfolder:{data}", epochs=1,
                          out=str(tmp_path / "a")), quiet=True)
    with pytest.raises(ConfigError, match="segment model"):
        fit(TrainConfig(model="unet", data="digits", epochs=1, out=str(tmp_path / "b")), quiet=True)
    with pytest.raises(DataError, match="segfolder"):
        fit(TrainConfig(task="segment", model="unet", data="digits", epochs=1, out=str(tmp_path / "c")), quiet=True)
    with pytest.raises(DataError, match="superres:DIR"):
        fit(TrainConfig(task="super-resolve", model="espcn", data="digits", epochs=1, out=str(tmp_path / "d")),
              quiet=True)
    with pytest.raises(ConfigError, match="mixup_alpha.*classification only"):
        TrainConfig(task="segment", mixup_alpha=0.2).validate()
    with pytest.raises(ConfigError, match="scale must be 2, 3 or 4"):
        TrainConfig(task="super-resolve", scale=5).validate()
    with pytest.raises(ConfigError, match="unknown task"):
        TrainConfig(task="detect").validate()


def test_dense_models_run_under_bench(tmp_path):
    for name, size in (("espcn", "1x24x32"), ("linknet_resnet18", "3x64x96")):
        result = run_cli("bench", name, "--input", size, "--batch", "1", "--backend", "torch,onnxruntime",
                         "--warmup", "1", "--repeats", "2", "--threads", "1", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)["rows"]
        assert {r["backend"] for r in rows} == {"torch", "onnxruntime"}
        assert all(r["images_per_s"] > 0 for r in rows)
