"""The README's Python examples run as written, in order, in one namespace (in a temporary folder: they write
plan.json and a run folder)."""
import re
from pathlib import Path

import pytest

from fxcompress.data import FASHION_MNIST_DIR

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_has_its_examples():
    assert len(python_blocks(README.read_text())) >= 3


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_the_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in python_blocks(README.read_text()):
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "runs" / "oneshot" / "kept.pt").is_file()
    assert namespace["result"].trajectory.steps[-1]["latency_ratio"] > 0
