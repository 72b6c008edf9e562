"""The device-only suite: it runs on the GPU machine (docs/performance.md says how) and skips elsewhere."""

import pytest
import torch


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="device-only: needs CUDA (run tests/gpu on the GPU machine)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
