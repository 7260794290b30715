"""Every ```python snippet in docs/heads.md runs as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "heads.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_there_are_snippets():
    assert len(SNIPPETS) == 4


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_snippet_runs(i, one_thread):
    exec(compile(SNIPPETS[i], f"docs/heads.md[snippet {i}]", "exec"), {"__name__": "__doc__"})
