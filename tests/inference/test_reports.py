"""report.html of evaluate, predict-slide and predict-slides: self-contained, rendered in a real headless browser.

The browser tests need Debian's `chromium` (CI installs it); without one they skip with a message."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmrcnet.reports import embed_png, render

BROWSER = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]  # fmt: skip


def screenshot(page: Path, tmp_path: Path, size: str = "1280,2400") -> tuple[np.ndarray, list[str]]:
    """(screenshot RGB array, console error lines) of `page` in headless Chromium."""
    if BROWSER is None:
        pytest.skip("no headless browser: apt-get install chromium (CI installs it)")
    shot = tmp_path / "shot.png"
    cmd = [BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={size}"]
    done = subprocess.run(
        [*cmd, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert shot.is_file(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    with Image.open(shot) as im:
        return np.asarray(im.convert("RGB")), console


def coloured_fraction(img: np.ndarray) -> float:
    """Fraction of clearly coloured pixels (maps, colour bars); the page itself is black, white and grey."""
    rgb = img.astype(np.int16)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def test_reports_are_self_contained_and_escape_text(tmp_path: Path) -> None:
    png = tmp_path / "map.png"
    Image.fromarray(np.full((8, 8, 3), (200, 30, 30), np.uint8)).save(png)
    uri = embed_png(png)
    assert uri.startswith("data:image/png;base64,") and embed_png(tmp_path / "absent.png") is None
    out = render("slide.html.j2", tmp_path / "report.html", title="<script>alert(1)</script>",
                 summary={"slide": "s", "pixel_size_um": 0.5, "pixel_size_source": "user", "n_tissue_tiles": 3,
                          "n_grid_tiles": 9, "fov_um": 112.0, "step_um": 112.0, "tiles_per_second": 1.0,
                          "precision": "fp32", "seconds_total": 1.0},
                 figures=[{"src": uri, "caption": "map"}], provenance={"k": 50})  # fmt: skip
    html = out.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html  # autoescaped
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html)  # nothing loaded from outside the file


@pytest.mark.extra
def test_slide_reports_and_the_batch_index_render_in_a_browser(run: Path, tmp_path: Path) -> None:
    from cmrcnet.cli import main

    from test_slide import UM_PER_PX, draw_slide

    Image.fromarray(draw_slide()).save(tmp_path / "s1.png")
    (tmp_path / "m.csv").write_text(f"slide,pixel_size\ns1.png,{UM_PER_PX}\nmissing.png,\n")
    out = tmp_path / "out"
    assert main(["predict-slides", "--manifest", str(tmp_path / "m.csv"), "--model", str(run), "--out", str(out),
                 "--quiet"]) == 101  # fmt: skip
    img, console = screenshot(out / "s1" / "report.html", tmp_path)
    assert console == []
    assert coloured_fraction(img) > 0.05  # thumbnail, tumour score and heatmaps are visible
    index = (out / "index.html").read_text()
    assert 'href="s1/report.html"' in index and "missing" in index and "failed" in index
    img, console = screenshot(out / "index.html", tmp_path, size="1280,800")
    assert console == [] and img.std() > 10


@pytest.mark.extra
def test_evaluation_report_renders_in_a_browser(run: Path, tmp_path: Path) -> None:
    from cmrcnet import api

    model = api.Model.load(run)
    ds = Path(model.trained.run_info["data_dir"])
    pred = model.predict(ds, ["synS1"], progress=False)
    metrics = api.evaluate(pred, ds, tmp_path / "eval")
    assert "report.html" in metrics["files"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "Per sample" in html
    img, console = screenshot(tmp_path / "eval" / "report.html", tmp_path)
    assert console == [] and coloured_fraction(img) > 0.05
