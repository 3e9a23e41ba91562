"""The test tree's own rule: pytest imports test modules by basename (the rooms have no __init__.py), so
two test files with one name in different rooms stop the whole run at collection."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_name_of_its_own() -> None:
    rooms: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        rooms[path.name].append(str(path.parent.relative_to(TESTS)))
    shared = {name: sorted(where) for name, where in rooms.items() if len(where) > 1}
    assert not shared, f"test modules sharing a name (rename one): {shared}"
