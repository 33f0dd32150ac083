"""Tests for seqserve.model.data: the dates task, TSV reading and the tokenizer."""

from __future__ import annotations

import datetime
import re
from collections import Counter
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models

from seqserve.model.data import TASKS, Pair, dates_pairs, read_tsv, task_pairs, train_tokenizer
from seqserve.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, decode, encode_source, encode_target, load_tokenizer, special_ids, tokenizer_from_str
from seqserve.runtime.errors import DataError

# ---------------------------------------------------------------------------------------------
# An independent parser for the dates task: every source must parse back to its target.
# ---------------------------------------------------------------------------------------------

MONTHS = ["january", "february", "march", "april", "may", "june",
          "july", "august", "september", "october", "november", "december"]
MONTH_ABBRS = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7,
               "aug": 8, "sep": 9, "sept": 9, "oct": 10, "nov": 11, "dec": 12}
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
WEEKDAY_ABBRS = {"mon": 0, "tue": 1, "tues": 1, "wed": 2, "thu": 3, "thurs": 3,
                 "fri": 4, "sat": 5, "sun": 6}

# Weekday names spelled out so that "the" in "the 5th of ..." is never taken for one.
_WD = r"(?:(?P<wd>" + "|".join(sorted([*WEEKDAYS, *WEEKDAY_ABBRS], key=len, reverse=True)) + r")(?P<wdcomma>,)? )?"
_MON = r"(?P<mon>[a-z]+)(?P<mondot>\.)?"
_DAY = r"(?P<day>\d{1,2})(?P<ord>st|nd|rd|th)?"
_YEAR = r"(?P<year>\d{4})"
FAMILIES = {
    "day-month-year": _WD + _DAY + " " + _MON + " " + _YEAR,
    "month-day-year": _WD + _MON + " " + _DAY + r"(?P<comma>,)? " + _YEAR,
    "ordinal-of": _WD + r"(?P<the>the )?(?P<day>\d{1,2})(?P<ord>st|nd|rd|th) of " + _MON + r",? " + _YEAR,
    "iso": _YEAR + r"-(?P<month>\d{2})-(?P<day>\d{2})",
    "us-slashes": r"(?P<month>\d{1,2})/(?P<day>\d{1,2})/" + _YEAR,
    "dotted": r"(?P<day>\d{1,2})\.(?P<month>\d{1,2})\." + _YEAR,
}
FAMILY_RES = {name: re.compile(rx, re.IGNORECASE) for name, rx in FAMILIES.items()}
SPELLED_OUT = {"day-month-year", "month-day-year", "ordinal-of"}


def ordinal_suffix(day: int) -> str:
    """English ordinal suffix, written out independently of the module under test."""
    if day in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def is_mixed(word: str) -> bool:
    """A word in neither lower, UPPER nor Title case."""
    return word not in (word.lower(), word.upper(), word.capitalize())


def parse(source: str) -> tuple[str, re.Match[str], datetime.date]:
    """(family, match, date) for a generated source; fails the test if it is malformed."""
    hits = [(name, m) for name, rx in FAMILY_RES.items() if (m := rx.fullmatch(source))]
    assert len(hits) == 1, f"{source!r} matches families {[h[0] for h in hits]}"
    family, m = hits[0]
    groups = m.groupdict()
    if family in SPELLED_OUT:
        mon = groups["mon"].lower()
        if mon in MONTHS:
            assert not groups["mondot"], source
            month = MONTHS.index(mon) + 1
        else:
            assert mon in MONTH_ABBRS, source
            month = MONTH_ABBRS[mon]
    else:
        month = int(groups["month"])
    d = datetime.date(int(groups["year"]), month, int(groups["day"]))
    if groups.get("ord"):
        assert groups["ord"].lower() == ordinal_suffix(d.day), source
        assert not groups["day"].startswith("0"), source
    if groups.get("wd"):
        wd = groups["wd"].lower()
        weekday = WEEKDAYS.index(wd) if wd in WEEKDAYS else WEEKDAY_ABBRS[wd]
        assert weekday == d.weekday(), f"{source!r}: wrong weekday"
    if family == "iso":
        assert source == d.isoformat()
    return family, m, d


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return dates_pairs(5000, seed=1234)


def test_every_source_parses_back_to_its_target(pairs: list[Pair]) -> None:
    for pair in pairs:
        _, _, d = parse(pair.source)
        assert pair.target == d.isoformat()
        assert datetime.date.fromisoformat(pair.target) == d
        assert 1900 <= d.year <= 2099


def test_every_format_family_appears_and_spelled_out_dominates(pairs: list[Pair]) -> None:
    counts = Counter(parse(p.source)[0] for p in pairs)
    assert set(counts) == set(FAMILIES)
    spelled = sum(counts[f] for f in SPELLED_OUT)
    assert spelled > 0.6 * len(pairs)
    assert min(counts.values()) > 200


def test_variants_within_families_all_appear(pairs: list[Pair]) -> None:
    seen: set[str] = set()
    for p in pairs:
        family, m, _ = parse(p.source)
        g = m.groupdict()
        s = p.source
        if family in SPELLED_OUT:
            seen.add("month-full" if g["mon"].lower() in MONTHS else "month-abbr")
            if g["mondot"]:
                seen.add("month-abbr-dot")
            if s == s.lower():
                seen.add("case-lower")
            elif s == s.upper():
                seen.add("case-upper")
            elif any(is_mixed(w) for w in s.split()):
                seen.add("case-mixed")
            elif g["mon"] == g["mon"].capitalize():
                seen.add("case-title")
            if g["wd"]:
                seen.add("weekday-full" if g["wd"].lower() in WEEKDAYS else "weekday-abbr")
                seen.add("weekday-comma" if g["wdcomma"] else "weekday-no-comma")
            else:
                seen.add("no-weekday")
            if g["ord"]:
                seen.add(f"{family}-ordinal")
            elif g["day"].startswith("0"):
                seen.add(f"{family}-padded")
        if family == "month-day-year":
            seen.add("mdy-comma" if g["comma"] else "mdy-no-comma")
        if family == "ordinal-of":
            seen.add("the-of" if g["the"] else "ordinal-of-no-the")
        if family in ("us-slashes", "dotted"):
            padded = len(g["day"]) == 2 and len(g["month"]) == 2
            seen.add(f"{family}-{'padded' if padded else 'unpadded'}")
    expected = {
        "month-full", "month-abbr", "month-abbr-dot",
        "case-lower", "case-upper", "case-mixed", "case-title",
        "weekday-full", "weekday-abbr", "weekday-comma", "weekday-no-comma", "no-weekday",
        "day-month-year-ordinal", "month-day-year-ordinal", "ordinal-of-ordinal",
        "day-month-year-padded", "month-day-year-padded",
        "mdy-comma", "mdy-no-comma", "the-of", "ordinal-of-no-the",
        "us-slashes-padded", "us-slashes-unpadded", "dotted-padded", "dotted-unpadded",
    }
    assert expected <= seen, f"missing: {sorted(expected - seen)}"


def test_spec_examples_are_producible(pairs: list[Pair]) -> None:
    # Shapes named in the task description, with the digits abstracted away.
    shapes = {re.sub(r"\d", "9", p.source) for p in pairs}
    for example in ["99 November 9999", "November 99, 9999", "Nov 99 9999", "the 9th of November 9999",
                    "November 9th, 9999", "9999-99-99", "99/99/9999", "99.99.9999"]:
        assert any(re.fullmatch(re.sub(r"[A-Za-z]+", "[A-Za-z]+", example), s) for s in shapes), example


def test_years_cover_the_range(pairs: list[Pair]) -> None:
    decades = {int(p.target[:4]) // 10 for p in pairs}
    assert decades == set(range(190, 210))


def test_deterministic_for_a_seed() -> None:
    assert dates_pairs(500, seed=7) == dates_pairs(500, seed=7)
    assert dates_pairs(500, seed=7) != dates_pairs(500, seed=8)


def test_sources_are_distinct() -> None:
    pairs = dates_pairs(20_000, seed=3)
    assert len(pairs) == 20_000
    assert len({p.source for p in pairs}) == 20_000


def test_exclude_is_respected() -> None:
    held_out = dates_pairs(1000, seed=5)
    excluded = [p.source for p in held_out]  # a list, not a set: any collection works
    again = dates_pairs(1000, seed=5, exclude=excluded)
    assert len(again) == 1000
    assert not {p.source for p in again} & set(excluded)


def test_zero_and_invalid_counts() -> None:
    assert dates_pairs(0, seed=0) == []
    with pytest.raises(DataError):
        dates_pairs(-1, seed=0)


def test_task_pairs_dispatches_and_rejects_unknown_names() -> None:
    assert TASKS == ("dates",)
    assert task_pairs("dates", 50, seed=1) == dates_pairs(50, seed=1)
    with pytest.raises(DataError, match=r"'nope'.*dates"):
        task_pairs("nope", 10, seed=0)


# ---------------------------------------------------------------------------------------------
# TSV corpus
# ---------------------------------------------------------------------------------------------


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "corpus.tsv"
    path.write_bytes(data)
    return path


def test_read_tsv_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "hello\tbonjour\nNov 5 2026\t2026-11-05\n€ sign\tün\n".encode())
    assert read_tsv(path) == [
        Pair("hello", "bonjour"), Pair("Nov 5 2026", "2026-11-05"), Pair("€ sign", "ün"),
    ]
    assert read_tsv(str(path)) == read_tsv(path)


def test_read_tsv_crlf_and_no_final_newline(tmp_path: Path) -> None:
    assert read_tsv(write(tmp_path, b"a\tb\r\nc\td\r\n")) == [Pair("a", "b"), Pair("c", "d")]
    assert read_tsv(write(tmp_path, b"a\tb\nc\td")) == [Pair("a", "b"), Pair("c", "d")]


@pytest.mark.parametrize(
    ("data", "lineno", "what"),
    [
        (b"a\tb\nno tab here\n", 2, "found 1"),
        (b"a\tb\nx\ty\tz\n", 2, "found 3"),
        (b"a\tb\n\nc\td\n", 2, "found 1"),  # a blank line in the middle
        (b"a\tb\n  \tc\n", 2, "empty source"),
        (b"a\tb\nc\t \r\n", 2, "empty target"),
        (b"a\tb\nc\td\ne\xfff\tg\n", 3, "UTF-8"),
        (b"\n", 1, "found 1"),
    ],
)
def test_read_tsv_malformed_lines(tmp_path: Path, data: bytes, lineno: int, what: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_tsv(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{lineno}: ")
    assert what in message


def test_read_tsv_missing_directory_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent.tsv"))):
        read_tsv(tmp_path / "absent.tsv")
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        read_tsv(tmp_path)
    with pytest.raises(DataError, match="no pairs"):
        read_tsv(write(tmp_path, b""))


def test_read_tsv_ignores_a_byte_order_mark(tmp_path: Path) -> None:
    assert read_tsv(write(tmp_path, b"\xef\xbb\xbfa\tb\n")) == [Pair("a", "b")]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "Tuesday, the 5th of November 1985",
    "Hello, world! How are you today?",
    "She said: \"don't go\"; then (quietly) left.",
    "The price is $3.50 - or 3,50 EUR - per item.",
    "e-mail me at a.b@example.com, please.",
]


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    corpus = dates_pairs(5000, seed=99)
    texts = [p.source for p in corpus] + [p.target for p in corpus] + SENTENCES
    return train_tokenizer(texts, vocab_size=8000)


def test_special_ids(tokenizer: tokenizers.Tokenizer) -> None:
    assert special_ids(tokenizer) == {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_vocab_larger_than_possible_merges_is_fine(tokenizer: tokenizers.Tokenizer) -> None:
    # The dates corpus allows far fewer than 8000 merges; training just stops early.
    assert len(SPECIAL_TOKENS) < tokenizer.get_vocab_size() < 8000


def test_digits_are_single_tokens(tokenizer: tokenizers.Tokenizer) -> None:
    pieces = tokenizer.encode("1985", add_special_tokens=False).tokens
    assert [p.replace("\u2581", "") for p in pieces if p != "\u2581"] == ["1", "9", "8", "5"]


def test_round_trip_on_generated_dates(tokenizer: tokenizers.Tokenizer) -> None:
    for pair in dates_pairs(2000, seed=2024):
        for text in (pair.source, pair.target):
            ids = encode_target(tokenizer, text)
            assert UNK_ID not in ids, text
            assert decode(tokenizer, ids) == text
            assert decode(tokenizer, encode_source(tokenizer, text)) == text


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip_on_sentences(tokenizer: tokenizers.Tokenizer, text: str) -> None:
    assert decode(tokenizer, encode_target(tokenizer, text)) == text


def test_encode_source_ends_with_eos_and_target_has_no_specials(tokenizer: tokenizers.Tokenizer) -> None:
    src = encode_source(tokenizer, "the 5th of November 2026")
    tgt = encode_target(tokenizer, "2026-11-05")
    assert src[-1] == EOS_ID and BOS_ID not in src and EOS_ID not in src[:-1]
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(tgt)


def test_special_token_text_in_input_is_not_a_special_id(tokenizer: tokenizers.Tokenizer) -> None:
    ids = encode_source(tokenizer, "x </s> <pad> y")
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID
    assert PAD_ID not in ids


def test_decode_skips_specials_and_stops_at_eos(tokenizer: tokenizers.Tokenizer) -> None:
    ids = encode_target(tokenizer, "2026-11-05")
    more = encode_target(tokenizer, "1999-01-01")
    assert decode(tokenizer, [BOS_ID, *ids, EOS_ID, *more, PAD_ID]) == "2026-11-05"
    assert decode(tokenizer, [BOS_ID, UNK_ID, *ids, PAD_ID, PAD_ID]) == "2026-11-05"
    assert decode(tokenizer, [EOS_ID, *ids]) == ""
    assert decode(tokenizer, []) == ""


def test_save_and_load(tokenizer: tokenizers.Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    for loaded in (load_tokenizer(path), load_tokenizer(str(path)), tokenizer_from_str(path.read_text())):
        assert special_ids(loaded)["eos_id"] == EOS_ID
        for text in SENTENCES + ["x </s> y"]:
            assert encode_source(loaded, text) == encode_source(tokenizer, text)


def test_load_missing_or_corrupt_tokenizer(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match=re.escape(str(corrupt))):
        load_tokenizer(corrupt)
    with pytest.raises(DataError):
        tokenizer_from_str("not json")


def test_tokenizer_with_wrong_special_ids_is_rejected(tmp_path: Path) -> None:
    wrong = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    wrong.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    with pytest.raises(DataError, match="<pad> at id 1"):
        special_ids(wrong)
    path = tmp_path / "wrong.json"
    wrong.save(str(path))
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_tokenizer(path)
    with pytest.raises(DataError, match="lacks"):
        special_ids(tokenizers.Tokenizer(models.BPE()))


def test_train_rejects_no_text_and_tiny_vocab() -> None:
    with pytest.raises(DataError):
        train_tokenizer([], vocab_size=100)
    with pytest.raises(DataError):
        train_tokenizer(["abc"], vocab_size=4)
