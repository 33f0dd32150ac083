"""The demo model's bar: at least 99% exact match on 1,000 held-out generated dates.

Marked slow (it trains the full demo model, about 4 minutes on 2 CPU cores): `make test-slow`.
The settings are the ones `make demo` uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.model.train import TrainOptions, train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_model_reaches_99_percent_exact_match(tmp_path: Path) -> None:
    summary = train("dates", None, None, TrainOptions(out=tmp_path, epochs=12, lr_scale=0.5, valid_size=1000,
                                                      target_exact_match=0.99, max_minutes=4.5, device="cpu"))
    assert summary["best"]["exact_match"] >= 0.99, summary["best"]
