"""The README's layout table matches the tree: every module of the main rooms is named
in its folder's row, and every file a row names exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("model", "trainer", "export", "serving", "serving/backends", "serving/local", "jobs")


def layout_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| `([^`]+)/` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_module_of_a_room_is_in_its_row():
    rows = layout_rows()
    missing = []
    for room in ROOMS:
        assert room in rows, f"README layout table has no row for {room}/"
        for path in sorted((ROOT / room).glob("*.py")):
            if path.name != "__init__.py" and f"`{path.name}`" not in rows[room]:
                missing.append(f"{room}/{path.name}")
    assert not missing, f"modules the layout table does not name: {missing}"


def test_every_file_a_row_names_exists():
    rows = layout_rows()
    absent = []
    for room, text in rows.items():
        for name in re.findall(r"`([\w./]+\.(?:py|yaml))`", text):
            if not any((base / name).exists() for base in (ROOT / room, ROOT)):
                absent.append(f"{room}/{name}")
    assert not absent, f"the layout table names files that are not there: {absent}"


def test_every_top_level_package_has_a_row():
    rows = layout_rows()
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(rows), f"top-level packages without a row: {sorted(packages - set(rows))}"
