"""The README's Python example runs as printed (with the step counts and the draw made tiny), and
what it returns is what a user will do next with it: an array of 16 images in [-1, 1]."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (text in the README's example, what the test runs instead): the same calls, a few steps each
TINY = [
    ("n_samples=20000", "n_samples=600"),
    ("adapt(gan, fb.negatives)", "adapt(gan, fb.negatives, AdaptConfig(iters=3, n_models=2), progress=False)"),
    ('UnlearnConfig(method="el2")', 'UnlearnConfig(method="el2", iters=3), progress=False'),
]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## In Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_example_runs():
    code = readme_python_example()
    for printed, tiny in TINY:
        assert printed in code, f"the README's example no longer contains {printed!r}: update this test"
        code = code.replace(printed, tiny)
    scope: dict = {}
    exec("from agu_lib.adapt import AdaptConfig\n" + code, scope)  # noqa: S102 -- the README's own code, on purpose
    images = scope["images"].numpy()  # what a user does next: plot or save them
    assert images.shape == (16, 1, 16, 16)
    assert np.all(images >= -1) and np.all(images <= 1)
