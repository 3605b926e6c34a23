"""The README's serving snippet runs as written (CPU)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def snippet(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README.md has no python block after <!-- {marker} -->"
    return m.group(1)


def test_serving_snippet_runs(capsys):
    pytest.importorskip("flax")
    exec(compile(snippet("serving-snippet"), "README.md:serving-snippet", "exec"), {})
    out = capsys.readouterr().out
    tokens = eval(out.strip().splitlines()[-1])  # the printed [o.outputs[0].token_ids for o in outputs]
    assert len(tokens) == 2 and all(len(t) == 16 for t in tokens)
