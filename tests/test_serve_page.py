"""The page at ``/`` in headless Chromium (as tests/test_report.py drives it): pick an image, see the top-5 classes
as bars with the offline probabilities, and the Grad-CAM overlay; a refused file shows the server's message."""

from __future__ import annotations

import pytest
import torch

from helpers import headless_chromium
from test_serve_helpers import offline_top, running, tiny  # noqa: F401 - tiny is a fixture


def test_the_page_shows_top5_bars_and_the_gradcam_overlay(tiny, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    torch.set_num_threads(1)
    image = tiny["images"][0]
    expected = offline_top(tiny["loaded"], [image])[0]
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"these are notes, not pixels")
    driver = headless_chromium("1024,900")
    try:
        with running(tiny["served"]) as (url, _):
            driver.get(url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "smallcnn" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 5)
            wait.until(lambda d: d.execute_script(
                "const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0"))
            labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bars .bar .label")]
            values = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bars .bar .value")]
            widths = driver.execute_script(
                "return Array.from(document.querySelectorAll('#bars .fill')).map(e => e.style.width)")
            overlay = driver.execute_script("const i = document.getElementById('overlay'); "
                                            "return [i.naturalWidth, i.naturalHeight]")
            caption = driver.find_element(By.ID, "explain-caption").text
            severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]

            driver.find_element(By.ID, "file").send_keys(str(not_image))
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
            refusal = driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
    assert labels == [t["class"] for t in expected]
    assert values == [f"{100 * t['probability']:.1f}%" for t in expected]
    assert widths == [f"{100 * t['probability']:.1f}%" for t in expected]
    assert overlay == [16, 16]  # the model's view, coloured by the Grad-CAM of the top class
    assert caption == f"Grad-CAM of {expected[0]['class']}"
    assert severe == [], severe
    assert "is not an image" in refusal
