"""The README's console screenshots are there: every linked PNG exists and is a real image of a
screen (the script that makes them is bench/console_screenshots.py)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_every_linked_screenshot_exists():
    readme = (ROOT / "README.md").read_text()
    linked = sorted(set(re.findall(r"\((docs/console/[a-z0-9-]+\.png)\)", readme)))
    assert len(linked) >= 6, linked  # one per screen at least
    for path in linked:
        with Image.open(ROOT / path) as img:
            assert img.format == "PNG" and min(img.size) >= 300, (path, img.size)


def test_every_console_file_ships_in_the_wheel():
    """package-data must name every file under service/ui/static, or an installed service would
    serve a console with a missing module (the source tree would not show it)."""
    import tomllib
    from pathlib import PurePosixPath

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["service"]
    static = ROOT / "service" / "ui" / "static"
    files = [p.relative_to(ROOT / "service") for p in static.rglob("*") if p.is_file()]
    assert len(files) >= 10
    missed = [str(f) for f in files if not any(PurePosixPath(f).match(g) for g in patterns)]
    assert not missed, missed
