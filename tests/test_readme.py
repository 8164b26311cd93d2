"""The README's Python snippets run, in order, as one program."""

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user's session would have it
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        torch.set_default_dtype(previous)
