"""`.ci/run` on a fresh Debian or Ubuntu: the system packages it installs include what its own steps run."""

from __future__ import annotations

import re

from conftest import REPO


def test_ci_installs_make_and_venv():
    """`make test` and `python3 -m venv` need make and python3-venv, which a fresh Debian or Ubuntu lacks."""
    script = (REPO / ".ci" / "run").read_text().replace("\\\n", " ")
    installed = set(re.search(r"apt-get install (.*)", script)[1].split())
    assert re.search(r"^python3 -m venv ", script, re.M) and re.search(r"^make test ", script, re.M)
    assert {"make", "python3-venv"} <= installed
