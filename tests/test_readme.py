"""The README's own-train-step example runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_is_short():
    text = README.read_text()
    block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README example markers not found"
    code = block.group(1)
    assert len(code.strip().splitlines()) < 20
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert np.isfinite(float(namespace["loss"]))
    assert float(namespace["marginal_error"]) < 1e-3
