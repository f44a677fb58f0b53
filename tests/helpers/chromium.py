"""Headless Chromium for the tests that render a page in a real browser: a screenshot, and the count of pixels of
one colour in it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")


def screenshot(html: Path, png: Path, profile: Path, size: str = "1280,3000") -> subprocess.CompletedProcess:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}", html.resolve().as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 4) -> int:
    return int((np.abs(image.astype(int) - np.array(rgb)).max(axis=2) <= tolerance).sum())
