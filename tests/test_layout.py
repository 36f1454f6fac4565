"""The house's floor plan (ARCHITECTURE.md section 1): mtplx/'s top holds only what a user imports
or runs, and a module's file name says which one it is. The layers themselves are import-linter's
contracts in pyproject.toml, which .ci/run checks with `lint-imports`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtplx"

# Names two modules may still share while a rename waits (none now: cli/app.py became
# cli/commands.py, server/errors.py server/http_errors.py).
PENDING_RENAMES: set[str] = set()


def test_the_top_holds_at_most_ten_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 10, f"mtplx/ has {len(loose)} loose modules ({', '.join(loose)}): move one into its package"
    assert {"__init__.py", "__main__.py", "api.py", "errors.py"} <= set(loose)


def test_no_two_modules_share_a_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    shared = {name for name, n in names.items() if n > 1}
    assert shared - PENDING_RENAMES == set(), f"modules sharing a name: {sorted(shared - PENDING_RENAMES)}"
    assert PENDING_RENAMES - shared == set(), (
        f"{sorted(PENDING_RENAMES - shared)} no longer shared: remove it from PENDING_RENAMES")
