"""Render an HTML report to a PNG with headless Chromium (what a person would see in a browser).

    python scripts/render_report.py reports/eval/index.html reports/eval/screenshot.png

Needs Debian's `chromium` (apt-get install -y chromium). Everything a network could trigger is
switched off, so it works offline and in CI; the profile lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)


def render(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 2400,
           timeout: float = 120.0) -> Path:
    """Screenshot of file://html_path at width x height, written to png_path."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if not html_path.exists():
        raise FileNotFoundError(html_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--screenshot={png_path}", f"--window-size={width},{height}", html_path.as_uri(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png_path.exists() or png_path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="?", default="reports/eval/index.html")
    parser.add_argument("png", nargs="?", default="reports/eval/screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    print(render(args.html, args.png, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
