"""The README's reading-cost table is computed by bench/reading_cost.py from lists of definitions: every listed
definition must still exist, or the table counts what a reader can no longer open."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location("reading_cost", REPO / "bench" / "reading_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_listed_definition_exists_and_is_counted():
    rc, cache = load(), {}
    for variant, entries in rc.VARIANTS.items():
        files, lines, missing = rc.cost(entries, cache)
        assert not missing, f"{variant}: {missing}"
        assert lines >= len(entries) and files, variant


def test_a_definition_that_is_gone_is_named():
    rc = load()
    files, lines, missing = rc.cost(["driver.py:Run", "driver.py:no_such_function"], {})
    assert missing == ["driver.py:no_such_function"] and files == {"driver.py"} and lines > 1
