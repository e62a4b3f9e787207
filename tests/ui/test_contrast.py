"""The console's colour pairs meet WCAG AA for text (4.5:1) in the light and the dark scheme.

Read from the stylesheet's design tokens, so a changed colour is checked where it is defined."""

from __future__ import annotations

import re

import pytest

from service.ui.routes import STATIC

# (text colour, background it is drawn on): every pairing the stylesheet uses for text
PAIRS = [
    ("text", "bg"), ("text", "surface"), ("text", "surface-2"), ("muted", "bg"),
    ("muted", "surface"), ("muted", "surface-2"), ("accent", "surface"), ("accent", "surface-2"),
    ("accent", "accent-soft"), ("accent-ink", "accent"), ("ok", "ok-soft"), ("ok", "surface"),
    ("warn", "warn-soft"), ("bad", "bad-soft"), ("bad", "surface"),
]  # fmt: skip


def tokens(scheme: str) -> dict[str, str]:
    css = (STATIC / "app.css").read_text()
    light = css[css.index(":root {") : css.index("}", css.index(":root {"))]
    dark_start = css.index(":root {", css.index("prefers-color-scheme: dark"))
    dark = css[dark_start : css.index("}", dark_start)]
    block = light if scheme == "light" else dark
    return dict(re.findall(r"--([a-z0-9-]+):\s*(#[0-9a-fA-F]{6})", block))


def luminance(hex_colour: str) -> float:
    def channel(c: int) -> float:
        v = c / 255
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def ratio(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_ratio_matches_the_wcag_definition():
    assert ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic near-miss


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_colours_meet_aa(scheme):
    colours = tokens(scheme)
    low = {
        f"{fg} on {bg}": round(ratio(colours[fg], colours[bg]), 2)
        for fg, bg in PAIRS
        if ratio(colours[fg], colours[bg]) < 4.5
    }
    assert not low, low
