"""The house's structure, checked from the source: every import points to the same floor or down (so there are no
cycles between rooms), and every function outside the tests stays short enough to read at once.

A room is a folder of `pia_jax/` or one of its top-level modules; the command lines and benchmarks sit on top.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# room -> floor; an import may go to a room on its own floor only inside that room.
FLOORS = {
    "models": 1, "files": 1, "sharding": 1, "quiet": 1,
    "weights": 2, "media": 2, "compiled": 2,
    "sampling": 3,
    "eval": 4, "data": 4,
    "training": 5,
    "toy": 6,
    "cli": 7, "app": 7,
}
MAX_FUNCTION_LINES = 60


def _sources():
    for path in sorted(ROOT.glob("pia_jax/**/*.py")) + sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("bench/*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _room(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] != "pia_jax":
        return "cli"
    return rel[1].removesuffix(".py")


def _imported_rooms(tree):
    for node in ast.walk(tree):  # function-level imports count too
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "pia_jax" and len(parts) > 1:
                yield parts[1], node.lineno
            elif parts[0] == "pia_jax" and isinstance(node, ast.ImportFrom):  # from pia_jax import files, models
                yield from ((a.name, node.lineno) for a in node.names)


def test_every_room_has_a_floor():
    rooms = {_room(p) for p, _ in _sources()} - {"__init__"}
    assert rooms <= set(FLOORS), f"rooms without a floor in FLOORS: {sorted(rooms - set(FLOORS))}"


def test_imports_point_down():
    upward = []
    for path, tree in _sources():
        room = _room(path)
        for target, line in _imported_rooms(tree):
            if target != room and FLOORS.get(target, 0) >= FLOORS.get(room, 0):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({room}, floor {FLOORS.get(room)}) imports "
                              f"{target} (floor {FLOORS.get(target)})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_functions_fit_on_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path, tree in _sources() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
