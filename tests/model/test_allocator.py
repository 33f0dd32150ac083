"""The trainer's malloc settings: memory a training step frees stays in the process for the next.

Checked in fresh processes through glibc's own accounting (`mallinfo2`): by default an 8 MiB
buffer (the size of an activation of the demo model's larger batches) is mapped for itself and
unmapped when freed, so the next step's buffer comes as new, zeroed pages; with the settings it
comes from the heap, and the heap keeps it once freed. (Counting page faults over training steps
showed the same, 0.2-19 a step against 188-942, but glibc's placement of aligned blocks makes
those counts vary from run to run; its accounting does not.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from seqserve.model.allocator import keep_freed_memory

PROBE = r"""
import ctypes, sys, torch
from seqserve.model.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = mallinfo2()
buffer = torch.empty(2 << 20).fill_(1.0)  # 8 MiB, written
mapped = mallinfo2().hblkhd - before.hblkhd  # bytes in blocks mapped for themselves
del buffer
kept = mallinfo2().fordblks - before.fordblks  # free bytes the heap keeps
print(applied, mapped >> 20, kept >> 20)
"""


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    applied, mapped, kept = out.stdout.split()
    return applied, int(mapped), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_a_freed_activation_stays_in_the_heap_for_the_next_step() -> None:
    applied, mapped, kept = _probe("keep")
    assert applied == "True"
    assert mapped == 0  # served from the heap, not mapped for itself
    assert kept >= 8  # MiB: still the process's after it was freed
    _, mapped, kept = _probe("default")
    assert mapped >= 8  # glibc's default: a block this large is mapped for itself ...
    assert kept < 8  # ... and unmapped when freed


def test_keep_freed_memory_says_whether_it_applied() -> None:
    assert keep_freed_memory() is (sys.platform.startswith("linux"))
