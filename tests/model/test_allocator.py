"""The trainer's malloc settings: a training step reuses the memory the last one freed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seqserve.model.allocator import keep_freed_memory

# A few training steps of a small model in a fresh process, counting the minor page faults of the
# later ones: each fault is a page the kernel handed over and zeroed because malloc gave it back.
STEPS = r"""
import resource, sys, torch
from seqserve.model.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
from seqserve.model.transformer import Transformer
from seqserve.runtime.config import ModelConfig
torch.manual_seed(0)
torch.set_num_threads(1)
model = Transformer(ModelConfig(vocab_size=300, d_model=64, encoder_layers=1, decoder_layers=1, n_heads=2,
                                d_ff=128, dropout=0.0))
src, tgt = torch.randint(4, 300, (64, 20)), torch.randint(4, 300, (64, 20))
def step():
    model(src, tgt).logsumexp(-1).sum().backward()
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True, timeout=120)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_spares_the_page_faults_of_every_step() -> None:
    applied, kept = _faults_per_step("keep")
    assert applied == "True"
    _, default = _faults_per_step("default")
    # measured over 14 pairs of runs: 243-942 faults a step by default, 0.2-19 with the settings
    # (after 10 steps that let the heap reach its peak; after only 3, up to 75)
    assert kept * 5 < default, (kept, default)


def test_keep_freed_memory_says_whether_it_applied() -> None:
    assert keep_freed_memory() is (sys.platform.startswith("linux"))
