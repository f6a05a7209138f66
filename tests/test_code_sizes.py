"""Issue 37's rules, kept from rotting: outside the tests no function over 60 lines and no class over 150 (a
definition's lines: end_lineno - lineno + 1 of its ast node, docstring included); no timing and no test of the
step's kind inside the exchange rooms (sync/)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (".", "sync", "analysis", "bench")
LIMITS = {"function": 60, "class": 150}

# Issue 37, what is left (nothing now): definitions over the limit in files being reworked elsewhere. Remove a line when its
# definition is split; the test fails on a line that is no longer needed, so the list stays the truth.
ALLOWED = set()


def _definitions(tree, prefix=""):
    """(dotted name, "function" or "class", lines) for every def and class, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            what = "class" if isinstance(node, ast.ClassDef) else "function"
            yield prefix + node.name, what, node.end_lineno - node.lineno + 1
            yield from _definitions(node, f"{prefix}{node.name}.")
        else:
            yield from _definitions(node, prefix)


def oversized():
    """{"file: name": (kind, lines, limit)} for every definition over its limit."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for name, what, lines in _definitions(tree):
                if lines > LIMITS[what]:
                    found[f"{path.relative_to(ROOT).as_posix()}: {name}"] = (what, lines, LIMITS[what])
    return found


def test_no_long_definitions():
    over = {key: value for key, value in oversized().items() if key not in ALLOWED}
    assert not over, "over issue 37's limits (split them):\n" + "\n".join(
        f"  {key}: {what} of {lines} lines (limit {limit})" for key, (what, lines, limit) in sorted(over.items()))


def test_allow_list_is_current():
    stale = sorted(ALLOWED - set(oversized()))
    assert not stale, f"within the limits now, take them off ALLOWED: {', '.join(stale)}"


def room_timing_and_kinds():
    """["file:line: text"] of every clock call and every test of the step's kind inside the exchange rooms
    (sync/): the clock wraps the rooms from outside (measure.phase declares a room's function a phase), and a
    room takes the step in its own terms."""
    clock_call = re.compile(r"\bclock\.(mark|begin|phase_sums|per_step|step_times)\(")
    kind_test = re.compile(r"\bkind\s*(==|!=|in\b)|\bself\.kind\b")
    found = []
    for path in sorted((ROOT / "sync").glob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if clock_call.search(code) or kind_test.search(code):
                found.append(f"sync/{path.name}:{number}: {line.strip()}")
    return found


def test_rooms_hold_no_timing_and_no_kind_tests():
    found = room_timing_and_kinds()
    assert not found, "timing or a kind test inside a room (issue 37):\n" + "\n".join(f"  {f}" for f in found)
