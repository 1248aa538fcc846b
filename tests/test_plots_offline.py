"""`dvc plots show` must produce a page that renders without network access.

The project ships dvc_templates/offline_plots.html (built by
tools/build_plots_template.py) with vega, vega-lite and vega-embed inlined, and
points DVC at it with `plots.html_template` in .dvc/config.  These tests build
a throwaway DVC repo with the same layout and config, run `dvc plots show`, and
check the page; when Chromium is installed they also screenshot it with the
network cut off and check that a chart was drawn.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "dvc_templates" / "offline_plots.html"
SCREENSHOT_SCRIPT = REPO_ROOT / "tools" / "screenshot_plots.sh"
# Relative values of plots.html_template are resolved against the .dvc/ dir.
CONFIG_VALUE = "../dvc_templates/offline_plots.html"

PLOTS_PLACEHOLDER = "{" + "plot_divs" + "}"
SCRIPTS_PLACEHOLDER = "{" + "scripts" + "}"
LIBS = ("vega", "vega-lite", "vega-embed")

DVC_YAML = """\
plots:
  - metrics.csv:
      x: epoch
      y: accuracy
      template: linear
      title: Offline accuracy check
"""


def _accuracy(epoch: int) -> float:
    return 0.5 + 0.45 * (1 - math.exp(-epoch / 5))


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `dvc plots show` in a fresh repo configured like the project; return index.html."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert TEMPLATE.is_file(), f"{TEMPLATE} missing; run tools/build_plots_template.py"

    repo = tmp_path_factory.mktemp("plots_repo")
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path_factory.mktemp("dvc_site_cache")),
    }
    dvc = [sys.executable, "-m", "dvc"]

    _run(["git", "init", "-q"], repo, env)
    _run([*dvc, "init", "-q"], repo, env)
    (repo / "dvc_templates").mkdir()
    shutil.copy2(TEMPLATE, repo / "dvc_templates" / TEMPLATE.name)
    _run([*dvc, "config", "plots.html_template", CONFIG_VALUE], repo, env)

    rows = ["epoch,accuracy"] + [f"{e},{_accuracy(e):.4f}" for e in range(1, 21)]
    (repo / "metrics.csv").write_text("\n".join(rows) + "\n")
    (repo / "dvc.yaml").write_text(DVC_YAML)

    _run([*dvc, "plots", "show", "--out", "plots_out"], repo, env)
    page = repo / "plots_out" / "index.html"
    assert page.is_file()
    return page


def test_shipped_template_shape() -> None:
    html = TEMPLATE.read_text(encoding="utf-8")
    assert TEMPLATE.stat().st_size < 5 * 1024 * 1024
    assert html.count(PLOTS_PLACEHOLDER) == 1
    # Without this placeholder DVC has nowhere to put its CDN <script src> tags.
    assert SCRIPTS_PLACEHOLDER not in html
    for lib in LIBS:
        assert f'data-lib="{lib}@' in html, f"{lib} is not inlined"


def test_plots_page_is_self_contained(plots_page: Path) -> None:
    html = plots_page.read_text(encoding="utf-8")

    # No external script loads (DVC's default page uses cdn.jsdelivr.net).
    script_tags = re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)
    assert len(script_tags) >= 4  # three libraries + one per plot
    external = [t for t in script_tags if re.search(r"\bsrc\s*=", t, flags=re.IGNORECASE)]
    assert external == [], f"page loads external scripts: {external}"
    assert not re.search(r"src\s*=\s*[\"']?\s*(https?:)?//", html, flags=re.IGNORECASE)
    assert "cdn.jsdelivr.net" not in html

    # The libraries are inlined, with the versions the template advertises.
    for lib in LIBS:
        match = re.search(rf'data-lib="{lib}@(\d+\.\d+\.\d+)"', html)
        assert match, f"{lib} is not inlined"
    vega_version = re.search(r'data-lib="vega@(\d+\.\d+\.\d+)"', html).group(1)
    assert f'version="{vega_version}"' in html  # vega.min.js sets vega.version
    assert "vegaEmbed(" in html

    # The plot itself: spec and data from metrics.csv.
    assert "Offline accuracy check" in html
    for epoch in (1, 10, 20):
        assert f'"epoch": "{epoch}", "accuracy": "{_accuracy(epoch):.4f}"' in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_plots_page_renders_offline(plots_page: Path, tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    png = tmp_path / "plots.png"
    proc = subprocess.run(
        ["bash", str(SCREENSHOT_SCRIPT), str(plots_page), str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert png.is_file() and png.stat().st_size > 0

    with image_mod.open(png) as img:
        rgb = img.convert("RGB")
    # The chart (title, axes, line, legend) sits in the top-left corner of the page.
    area = rgb.crop((0, 0, 600, 450))
    colors = area.getcolors(maxcolors=area.width * area.height)
    non_white = sum(n for n, c in colors if c != (255, 255, 255))
    # Saturated pixels: the data line / legend swatch, not the grey axes and text.
    saturated = sum(n for n, c in colors if max(c) - min(c) > 60)
    assert len(colors) > 50, f"only {len(colors)} colors: page looks blank"
    assert non_white > 2000, f"only {non_white} non-white pixels: page looks blank"
    assert saturated > 200, f"only {saturated} coloured pixels: no data line drawn"
