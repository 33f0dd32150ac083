"""Checkpoint averaging, the paper's last mile (section 6.1: the base models averaged their last 5
checkpoints): the weights of the last N epochs kept on disk, and their element-wise mean."""

from __future__ import annotations

from pathlib import Path

import torch

from seqserve.model.checkpoint import atomic_save


class EpochSnapshots:
    """The weights at the end of each of the last `keep` epochs, as RUN_DIR/epochs/epoch-K.pt."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.folder, self.keep = run_dir / "epochs", keep

    def paths(self) -> list[Path]:
        """Snapshot files, oldest epoch first."""
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))

    def add(self, epoch: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Write this epoch's weights and delete those older than the last `keep`."""
        atomic_save(state_dict, self.folder / f"epoch-{epoch}.pt")
        for old in self.paths()[:-self.keep]:
            old.unlink()

    def average(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The mean of the kept snapshots and the epochs it covers."""
        paths = self.paths()
        return average_state_dicts([torch.load(p, map_location="cpu", weights_only=True) for p in paths]), [
            int(p.stem.split("-")[1]) for p in paths]


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (computed in float64); other tensors from the last."""
    if not states:
        raise ValueError("nothing to average")
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out
