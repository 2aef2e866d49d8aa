import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # hostile.py: the guard and the tally

import hostile

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="session")
def guard():
    """A child process for calls that reach compiled code: a crash there is counted, not fatal."""
    g = hostile.Guard()
    yield g
    g.close()


def pytest_terminal_summary(terminalreporter):
    counts = {kind: hostile.COUNTS[kind] for kind in hostile.KINDS}
    total = sum(counts.values())
    if not total:
        return
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "hostile-counts.json").write_text(json.dumps({"inputs": total, **counts}, indent=1))
    terminalreporter.write_sep("-", "hostile inputs")
    terminalreporter.write_line(
        f"{total} inputs tried: {counts['clear_error']} clear errors, {counts['checked_answer']} checked answers, "
        f"{counts['crash']} crashes, {counts['wrong']} wrong answers or unclear errors")
