"""Render report.html in a real headless Chromium and check the screenshot is a page, not a blank."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.sample_report import sample_record

from modelprobe.report import compare, write_html

CHROMIUM = Path("/usr/bin/chromium")

# .ci/run installs Chromium, so in CI (env CI set) a missing browser is a failure, not a silent skip.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="/usr/bin/chromium not installed (Debian: apt-get install chromium; .ci/run does); HTML not rendered",
)


def _screenshot(html: Path, tmp_path: Path, size: str = "1200,2000") -> Path:
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
        f"--window-size={size}", html.resolve().as_uri(),
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-2000:]}"
    return shot


def test_report_html_renders_in_chromium(tmp_path):
    import matplotlib.image
    import numpy as np

    after = sample_record()
    before = sample_record()
    before.probes[1].claims[0].verdict = "pass"
    before.probes[1].claims[0].effect = 0.85
    html = write_html(after, tmp_path / "report", comparison=compare(before, after))

    shot = _screenshot(html, tmp_path)
    img = matplotlib.image.imread(str(shot))
    assert img.ndim == 3 and img.shape[0] >= 1000 and img.shape[1] >= 1000
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(rgb, axis=0)
    assert len(colours) > 50, f"screenshot looks blank: {len(colours)} distinct colours"
    non_white = (rgb.min(axis=1) < 240).mean()
    assert non_white > 0.02, f"screenshot is {non_white:.1%} non-white"
    # the verdict colours are on the page (pass green, fail red)
    for hexcol in ("1a7f37", "cf222e"):
        target = np.array([int(hexcol[i : i + 2], 16) for i in (0, 2, 4)])
        assert (np.abs(rgb.astype(int) - target).sum(axis=1) < 12).any(), f"#{hexcol} not rendered"


def test_history_html_renders_in_chromium(tmp_path):
    import json

    import matplotlib.image
    import numpy as np

    from modelprobe.cli import main

    paths = []
    for k, effect in enumerate((0.82, 0.8, 0.4)):  # the third release flips the claim
        rec = sample_record()
        rec.started = f"2026-0{k + 1}-01T00:00:00+00:00"
        claim = rec.probes[0].claims[0]
        claim.effect, claim.ci = effect, (effect - 0.05, effect + 0.05)
        claim.verdict = "pass" if effect > 0.5 else "fail"
        paths.append(tmp_path / f"v{k + 1}.json")
        paths[-1].write_text(json.dumps(rec.model_dump(mode="json")))
    html = tmp_path / "history" / "history.html"
    assert main(["history", *map(str, paths), "-o", str(html)]) == 0

    shot = _screenshot(html, tmp_path)
    img = matplotlib.image.imread(str(shot))
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 50, "screenshot looks blank"
    assert (rgb.min(axis=1) < 240).mean() > 0.02
    for hexcol in ("1a7f37", "cf222e"):  # pass green and the flip's red are on the page
        target = np.array([int(hexcol[i : i + 2], 16) for i in (0, 2, 4)])
        assert (np.abs(rgb.astype(int) - target).sum(axis=1) < 12).any(), f"#{hexcol} not rendered"
