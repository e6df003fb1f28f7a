"""pytest setup shared by every test file.

- Without CUDA, cab_fast's kernels run in the Triton interpreter. TRITON_INTERPRET must be set before
  triton is first imported, and importing cab_reference imports triton (through transformers), so it is
  set here, before any test module is collected.
- `--slow` runs the tests marked `slow` (long hypothesis runs); they are skipped by default.
- Helpers shared by the test files (oracle, tiny models, policy cases and keep promises, near ties,
  the bad-input table) are plain functions in tests/testkit.py, imported where used; tests import the suite
  generators (suites/) and the tensor-parallel check (bench/) by module name too, so those folders go on
  sys.path here.
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(ROOT, folder) for folder in ("tests", "suites", "bench")]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, skipped unless --slow is given")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    import pytest
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
