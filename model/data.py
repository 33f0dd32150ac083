"""Training data for seqserve: built-in tasks, TSV corpora and tokenizer training.

Turning text into token ids and back (for training and serving alike) is in
`seqserve.runtime.tokenizer`. The module uses only the standard library and HF `tokenizers`,
never torch."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from seqserve.runtime.errors import DataError
from seqserve.runtime.tokenizer import SPECIAL_TOKENS, guard_specials, special_ids


@dataclass(frozen=True)
class Pair:
    """One training example: a source text and the target text it should map to."""

    source: str
    target: str


# ---------------------------------------------------------------------------------------------
# Built-in task: dates
# ---------------------------------------------------------------------------------------------

# Spelled out here rather than taken from `calendar`, whose names follow the process locale.
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
# Several abbreviations per name where people commonly use more than one.
_MONTH_ABBRS = (
    ("Jan",), ("Feb",), ("Mar",), ("Apr",), ("May",), ("Jun",),
    ("Jul",), ("Aug",), ("Sep", "Sept"), ("Oct",), ("Nov",), ("Dec",),
)
# Indexed by `date.weekday()`: Monday is 0.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WEEKDAY_ABBRS = (("Mon",), ("Tue", "Tues"), ("Wed",), ("Thu", "Thurs"), ("Fri",), ("Sat",), ("Sun",))

# Every calendar day from 1900-01-01 to 2099-12-31 is equally likely, so years are uniform
# up to the one extra day of a leap year.
_FIRST_DAY = date(1900, 1, 1).toordinal()
_DAY_SPAN = date(2100, 1, 1).toordinal() - _FIRST_DAY


def _ordinal(day: int) -> str:
    """`day` with its English ordinal suffix: 1st, 2nd, 3rd, 4th, 11th, 21st."""
    # 11th, 12th and 13th break the rule that the last digit picks the suffix.
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _day(d: date, rng: random.Random) -> str:
    """The day as a number, sometimes zero-padded, sometimes an ordinal."""
    r = rng.random()
    if r < 0.25:
        return _ordinal(d.day)
    if r < 0.4:
        return f"{d.day:02d}"
    return str(d.day)


def _month(d: date, rng: random.Random) -> str:
    """The month's full name or an abbreviation, which sometimes carries a full stop."""
    if rng.random() < 0.6:
        return _MONTHS[d.month - 1]
    abbr = rng.choice(_MONTH_ABBRS[d.month - 1])
    # "May." is not an abbreviation of anything, so it never gets the stop.
    if abbr != "May" and rng.random() < 0.2:
        abbr += "."
    return abbr


def _weekday(d: date, rng: random.Random) -> str:
    """An optional prefix naming the date's own weekday: "", "Tuesday, ", "Tue "."""
    if rng.random() >= 0.3:
        return ""
    wd = d.weekday()
    name = _WEEKDAYS[wd] if rng.random() < 0.6 else rng.choice(_WEEKDAY_ABBRS[wd])
    return name + (", " if rng.random() < 0.6 else " ")


def _day_month_year(d: date, rng: random.Random) -> str:
    """25 November 2026, Tue 05 Nov 2026, 5th Sept. 2026."""
    return f"{_weekday(d, rng)}{_day(d, rng)} {_month(d, rng)} {d.year}"


def _month_day_year(d: date, rng: random.Random) -> str:
    """November 25, 2026, Nov 25 2026, Tuesday, November 5th, 2026."""
    comma = "," if rng.random() < 0.6 else ""
    return f"{_weekday(d, rng)}{_month(d, rng)} {_day(d, rng)}{comma} {d.year}"


def _ordinal_of(d: date, rng: random.Random) -> str:
    """the 5th of November 2026, 5th of Nov, 2026."""
    the = "the " if rng.random() < 0.7 else ""
    comma = "," if rng.random() < 0.3 else ""
    return f"{_weekday(d, rng)}{the}{_ordinal(d.day)} of {_month(d, rng)}{comma} {d.year}"


def _iso(d: date, rng: random.Random) -> str:
    """2026-11-25: the target format is also a valid input."""
    return d.isoformat()


def _us_slashes(d: date, rng: random.Random) -> str:
    """11/25/2026 or 1/5/2026: always month first."""
    if rng.random() < 0.5:
        return f"{d.month:02d}/{d.day:02d}/{d.year}"
    return f"{d.month}/{d.day}/{d.year}"


def _dotted(d: date, rng: random.Random) -> str:
    """25.11.2026 or 5.1.2026: always day first."""
    if rng.random() < 0.5:
        return f"{d.day:02d}.{d.month:02d}.{d.year}"
    return f"{d.day}.{d.month}.{d.year}"


# Surface formats and their weights: the spelled-out ones take 8 of 11 parts, because that
# is where the model has something to learn. Numeric dates are ambiguous between writers
# ("05/06/2026" is 6 May in the US and 5 June in most of Europe), and a corpus in which one
# source maps to two targets cannot be learned, so each separator has exactly one reading:
# slashes are always month/day/year, dots always day.month.year, dashes always ISO. Years
# always have four digits, so the century is never a guess.
_DATE_FORMATS: tuple[tuple[Callable[[date, random.Random], str], float], ...] = (
    (_day_month_year, 3.0),
    (_month_day_year, 3.0),
    (_ordinal_of, 2.0),
    (_iso, 1.0),
    (_us_slashes, 1.0),
    (_dotted, 1.0),
)
_FORMAT_FUNCS = tuple(f for f, _ in _DATE_FORMATS)
_FORMAT_CUM_WEIGHTS = tuple(
    sum(w for _, w in _DATE_FORMATS[: i + 1]) for i in range(len(_DATE_FORMATS))
)

# Letter case of the whole source: the formats above write names in Title case.
_CASES = ("title", "lower", "upper", "mixed")
_CASE_CUM_WEIGHTS = (0.6, 0.8, 0.95, 1.0)


def _is_mixed(word: str) -> bool:
    """True for a word that is neither lower, UPPER nor Title case ("noVember")."""
    return word not in (word.lower(), word.upper(), word.capitalize())


def _mixed_case(text: str, rng: random.Random) -> str:
    """`text` with each letter's case drawn at random, with at least one visibly mixed word."""
    if not any(c.isalpha() for c in text):
        return text  # numeric formats have no case to vary
    while True:
        out = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)
        # A draw that happens to come out as "NOVEMBER" or "november" is not mixed case.
        if any(_is_mixed(w) for w in out.split()):
            return out


def _recase(text: str, rng: random.Random) -> str:
    """`text` in a randomly chosen letter case."""
    case = rng.choices(_CASES, cum_weights=_CASE_CUM_WEIGHTS)[0]
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    if case == "mixed":
        return _mixed_case(text, rng)
    return text


def _check_count(n: int) -> None:
    """Reject a pair count that is not a non-negative integer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"number of pairs must be a non-negative integer, got {n!r}")


def dates_pairs(n: int, *, seed: int, exclude: Collection[str] = ()) -> list[Pair]:
    """n distinct-source pairs mapping English dates to ISO 8601, deterministic for a seed."""
    _check_count(n)
    rng = random.Random(seed)
    # A set makes the membership test O(1) whatever collection the caller passed.
    excluded = exclude if isinstance(exclude, (set, frozenset)) else frozenset(exclude)
    seen: set[str] = set()
    pairs: list[Pair] = []
    # The space of sources is in the tens of millions, so duplicates are rare; the cap only
    # turns an impossible request (a huge `exclude`) into an error instead of a hang.
    budget = 20 * n + 10_000
    while len(pairs) < n:
        budget -= 1
        if budget < 0:
            raise DataError(f"could not generate {n} distinct dates; got {len(pairs)}")
        d = date.fromordinal(_FIRST_DAY + rng.randrange(_DAY_SPAN))
        fmt = rng.choices(_FORMAT_FUNCS, cum_weights=_FORMAT_CUM_WEIGHTS)[0]
        source = _recase(fmt(d, rng), rng)
        if source in seen or source in excluded:
            continue
        seen.add(source)
        pairs.append(Pair(source, d.isoformat()))
    return pairs


_TASK_FUNCS: dict[str, Callable[..., list[Pair]]] = {"dates": dates_pairs}

TASKS: tuple[str, ...] = tuple(_TASK_FUNCS)


def task_pairs(name: str, n: int, *, seed: int, exclude: Collection[str] = ()) -> list[Pair]:
    """n distinct-source pairs from built-in task `name`, deterministic for a seed; sources in `exclude` are never produced."""
    try:
        make = _TASK_FUNCS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
    return make(n, seed=seed, exclude=exclude)


# ---------------------------------------------------------------------------------------------
# TSV corpus
# ---------------------------------------------------------------------------------------------


def _split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Number the lines of `data` from 1, dropping the empty remainder after a final newline."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        yield lineno, line[:-1] if line.endswith(b"\r") else line


def read_tsv(path: str | os.PathLike) -> list[Pair]:
    """Read a UTF-8 `source<TAB>target` corpus."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read corpus: {e.strerror or e}") from None
    # An editor's byte-order mark would otherwise become part of the first source.
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    pairs: list[Pair] = []
    for lineno, raw in _split_lines(data):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
            raise DataError(f"{where}: not valid UTF-8 ({bad})") from None
        # Nothing is skipped silently: a blank or short line usually means the file is broken.
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{where}: expected 2 tab-separated fields (source, target), found {len(fields)}")
        # Surrounding whitespace is stripped because the tokenizer would not give it back anyway.
        source, target = fields[0].strip(), fields[1].strip()
        if not source:
            raise DataError(f"{where}: empty source")
        if not target:
            raise DataError(f"{where}: empty target")
        pairs.append(Pair(source, target))
    if not pairs:
        raise DataError(f"{path}: corpus has no pairs")
    return pairs


# ---------------------------------------------------------------------------------------------
# Tokenizer training (loading, special ids, encoding and decoding: seqserve.runtime.tokenizer)
# ---------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 1) -> tokenizers.Tokenizer:
    """Train a BPE tokenizer on `texts` with the special tokens at ids 0..3; a merge needs to be
    seen `min_frequency` times to become a token."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise DataError(
            f"vocab_size must exceed {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}"
        )
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    # Metaspace keeps spaces as "▁" so decoding restores them; single digits let a model
    # learn a year once instead of once per BPE merge of it ("19", "198", "1985").
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.Metaspace()
    # Listed first, the special tokens take ids 0..3. When the corpus allows fewer merges
    # than `vocab_size` (the dates task), the trainer simply stops with a smaller vocabulary.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise DataError("cannot train a tokenizer on no text")
    special_ids(tokenizer)
    return guard_specials(tokenizer)
