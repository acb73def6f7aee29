"""The text and markdown reports of the classic constant network, against golden files.

Run `pytest tests/test_golden.py --update-golden` after an intended change of the report, and review
the diff of tests/golden/ like any other change.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from initdoctor.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("fmt, extra", [("text", []), ("text", ["--fix"]), ("markdown", ["--fix"])],
                         ids=["text", "text-fix", "markdown-fix"])
def test_report_matches_golden_file(fmt, extra, capsys, request, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    main(["check", "examples/xavier_classic.py", "--format", fmt, "--fail-on", "never", *extra])
    out = capsys.readouterr().out
    path = GOLDEN / f"xavier_classic.{fmt}{'-fix' if extra else ''}.{'md' if fmt == 'markdown' else 'txt'}"
    if request.config.getoption("--update-golden"):
        path.write_text(out)
    assert out == path.read_text(), f"{path.name} differs; rerun with --update-golden if intended"
    assert max(len(line) for line in out.splitlines()) <= 100 or fmt == "markdown"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
