"""Shared test set-up: GPU tests skip without CUDA; tiny Hugging Face models built offline."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """A test that runs the CLI in-process leaves Hydra's job logging (a file handler in the run
    directory it then deletes) on the root logger; later log lines would try to reopen that file."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
