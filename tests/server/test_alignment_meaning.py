"""Alignments mean something: on the trained demo model, the source token an output digit attends to
most lies in the source field it comes from (year, month, day) far more often than chance.

Slow (trains the demo model once for the slow tests): `make test-slow`. Measured when written:
year 76%, month 77%, day 93%, 80% overall over 2,691 output digits of 300 dates. A uniform or
random attention puts the argmax in the right field about a third of the time or less.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from seqserve.model.data import dates_pairs
from seqserve.runtime.tokenizer import load_tokenizer
from seqserve.runtime.engine import OnnxSeq2Seq, pad_batch

MONTH_PREFIXES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def source_fields(source: str, target: str) -> dict[str, tuple[int, int]]:
    """Character spans of the year, month and day in a dates source (whatever its format)."""
    year, _, _ = target.split("-")
    spans = {"year": re.search(year, source).span()}
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", source.strip()):
        spans.update(month=(5, 7), day=(8, 10))
    elif (m := re.search(r"(\d+)/(\d+)/", source)) is not None:  # US order
        spans.update(month=m.span(1), day=m.span(2))
    elif (m := re.search(r"(\d+)\.(\d+)\.\d{4}", source)) is not None:  # day first
        spans.update(day=m.span(1), month=m.span(2))
    else:
        words = [w for w in re.finditer(r"[A-Za-z]+", source)
                 if w.group().lower()[:3] in MONTH_PREFIXES and w.group().lower()[:3] not in WEEKDAYS]
        days = [d for d in re.finditer(r"\d+", source) if d.group() != year]
        spans.update(month=words[-1].span(), day=days[0].span())
    return spans


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_output_digits_attend_to_their_source_field(demo_model_dir: Path) -> None:
    engine = OnnxSeq2Seq(demo_model_dir, device="cpu")
    tokenizer = load_tokenizer(engine.model_dir.tokenizer_path)
    cfg = engine.config
    hits = total = 0
    for pair in dates_pairs(300, seed=99):
        encoding = tokenizer.encode(pair.source)
        ids, mask = pad_batch([list(encoding.ids) + [cfg.eos_id]], cfg.pad_id)
        cross_key, cross_value = engine.encode(ids, mask)
        past_key = past_value = engine.empty_cache(1)
        token, out, rows = cfg.bos_id, [], []
        for step in range(cfg.max_target_len):
            logits, past_key, past_value, alignment = engine.decode(
                np.array([[token]]), np.array([[step]]), past_key, past_value, np.ones((1, step + 1), bool),
                cross_key, cross_value, mask)
            token = int(logits[0, -1].argmax())
            if token == cfg.eos_id:
                break
            out.append(token)
            rows.append(alignment[0, -1])
        if tokenizer.decode(out) != pair.target:
            continue  # only judge the attention of correct outputs
        spans = source_fields(pair.source, pair.target)
        position = 0
        for token, row in zip(out, rows):
            field = "year" if position < 4 else "month" if 5 <= position < 7 else "day" if position >= 8 else None
            position += len(tokenizer.id_to_token(token).replace("\u2581", ""))
            if field is None:
                continue
            start, end = spans[field]
            in_field = [i for i, (a, b) in enumerate(encoding.offsets) if b > a and a < end and b > start]
            total += 1
            hits += int(row[: len(encoding.offsets)].argmax()) in in_field
    assert total > 1000
    rate = hits / total
    print(f"alignment argmax in the right source field: {rate:.1%} of {total} output digits")
    assert rate >= 0.6, rate
