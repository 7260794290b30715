"""Every ```python snippet in README.md runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_three_usage_snippets():
    text = "\n".join(SNIPPETS)
    assert "MuonWithAuxAdam" in text and "cm_qk(" in text and "CompositionalMuon.from_model" in text


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_snippet_runs(i):
    exec(compile(SNIPPETS[i], f"README.md[snippet {i}]", "exec"), {"__name__": "__readme__"})
