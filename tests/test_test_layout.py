"""pytest imports test modules by basename (the test folders are not packages): two files of one name in
different folders stop the whole run at collection. Every test and helper module name is unique."""

import collections
import pathlib


def test_test_module_basenames_are_unique():
    root = pathlib.Path(__file__).parent
    names = collections.Counter(p.name for p in root.rglob("*.py") if p.name != "conftest.py")
    assert not [n for n, count in names.items() if count > 1]
