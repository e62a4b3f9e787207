"""The README keeps its promises: two set-up commands and every setting documented."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented():
    missing = [f for f in Settings.model_fields if f"PROMPTSERVE_{f.upper()}" not in README]
    assert not missing, missing


def test_two_setup_commands():
    assert "make test" in README and "make demo" in README and "make run" in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_client_calls_the_readme_shows_exist():
    import re

    from promptserve.client import Client, Jobs

    calls = set(re.findall(r"\bc\.(\w+)\(", README))
    jobs = set(re.findall(r"\bc\.jobs\.(\w+)\(", README))
    assert {"classify", "upload", "activate", "rollback", "embed"} <= calls
    assert calls <= set(dir(Client)) and jobs and jobs <= set(dir(Jobs))
