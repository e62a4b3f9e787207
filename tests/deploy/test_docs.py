"""deploy/README.md says what works: its promptserve commands parse, its files exist, and the
top-level README links it from a Deploy section."""

from __future__ import annotations

import re
import shlex

from service.cli import parse
from tests.deploy.common import DEPLOY, ROOT

GUIDE = (DEPLOY / "README.md").read_text()


def test_every_promptserve_command_in_the_guide_parses():
    commands = re.findall(r"(?:^|exec (?:\S+ )*?)(promptserve [^\n#`]+)", GUIDE, re.M)
    assert len(commands) >= 6, commands
    for command in commands:
        args = shlex.split(command)[1:]
        parse(args)  # exits (SystemExit) on an unknown command or flag


def test_the_guide_covers_operations_and_names_real_files():
    for heading in ("## Bring-up", "## Upgrade", "## Backup of Redis", "## Rotation of keys",
                    "## Kubernetes"):  # fmt: skip
        assert heading in GUIDE
    for path in re.findall(r"`((?:deploy|tests)/[\w/.-]+)`", GUIDE):
        assert (ROOT / path).exists(), path


def test_readme_links_the_guide_from_a_deploy_section():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    assert "(deploy/README.md)" in section
