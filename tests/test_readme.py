"""The README's code examples run as written (Linen, NNX, OT-softmax + SupCon)."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = {"linen": 20, "nnx": 20, "ot-softmax": 32}  # name: most lines it may take


def example(name: str) -> str:
    block = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```\s*"
                      r"<!-- /readme-example -->", README.read_text(), re.S)
    assert block, f"README example {name!r} not found"
    return block.group(1)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs_and_is_short(name):
    code = example(name)
    assert len(code.strip().splitlines()) <= EXAMPLES[name]
    namespace = {}
    exec(compile(code, f"{README}:{name}", "exec"), namespace)  # noqa: S102 - our own README
    assert np.isfinite(float(namespace["loss"]))
    if name == "ot-softmax":
        assert float(np.max(np.abs(namespace["heights"]))) > 0  # the heights were re-solved
    else:
        assert float(namespace["marginal_error"]) < 1e-3


def test_every_readme_example_is_tested():
    assert set(re.findall(r"<!-- readme-example: ([\w-]+) -->", README.read_text())) == set(
        EXAMPLES)
