"""CPUAllocatorCallback: freed memory is reused during a CPU run instead of page-faulted anew.

Each case runs in a fresh interpreter: what glibc does with a 64 MiB block depends on the heap
earlier tests left behind (a free chunk held resident below their live allocations serves it
without a page fault), which is not what these tests are about."""
from __future__ import annotations

import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from slapo_lightning.lightning import CPUAllocatorCallback
from slapo_lightning.lightning.cpu_allocator import release_freed_memory, retain_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

BLOCK = 64 * 2**20


def page_faults_of_fresh_block() -> int:
    """Minor page faults this thread takes allocating, filling and freeing one 64 MiB tensor (filled
    by this thread alone, so that threads left running by other tests do not count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        torch.ones(BLOCK // 4)
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    finally:
        torch.set_num_threads(threads)


def retained_memory_is_reused_without_page_faults(tmp_path: Path) -> None:
    pages = BLOCK // resource.getpagesize()
    assert page_faults_of_fresh_block() > pages // 2  # glibc's default: its own mmap every time
    try:
        assert retain_freed_memory()
        for _ in range(3):  # the heap grows until the block fits in memory already freed
            page_faults_of_fresh_block()
        assert sum(page_faults_of_fresh_block() for _ in range(4)) < pages // 2
    finally:
        assert release_freed_memory()
    page_faults_of_fresh_block()
    assert page_faults_of_fresh_block() > pages // 2


class _Probe(pl.Callback):
    def __init__(self, allocator: CPUAllocatorCallback):
        self.allocator = allocator
        self.active_in_fit = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active_in_fit = self.allocator.active


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def callback_retains_during_a_cpu_fit_and_releases_after(tmp_path: Path) -> None:
    allocator = CPUAllocatorCallback()
    probe = _Probe(allocator)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[allocator, probe], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    assert probe.active_in_fit is True and allocator.active is False
    page_faults_of_fresh_block()
    assert page_faults_of_fresh_block() > BLOCK // resource.getpagesize() // 2


class _Failing(_Tiny):
    def training_step(self, batch, batch_idx):
        raise ValueError("broken step")


def callback_releases_when_the_run_fails(tmp_path: Path) -> None:
    allocator = CPUAllocatorCallback()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[allocator], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="broken step"):
        trainer.fit(_Failing(), torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    assert allocator.active is False
    page_faults_of_fresh_block()
    assert page_faults_of_fresh_block() > BLOCK // resource.getpagesize() // 2


CASES = {case.__name__: case for case in (retained_memory_is_reused_without_page_faults,
                                          callback_retains_during_a_cpu_fit_and_releases_after,
                                          callback_releases_when_the_run_fails)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_in_a_fresh_process(case, tmp_path):
    done = subprocess.run([sys.executable, __file__, case, str(tmp_path)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__" and len(sys.argv) == 3:
    with tempfile.TemporaryDirectory(dir=sys.argv[2]) as directory:
        CASES[sys.argv[1]](Path(directory))
