"""User-like TSV corpora for training tests and for the figures in docs/training.md: deterministic
mappings from text spelled out in four languages (English, French, German, Spanish) to a compact
normalized form, the kind of corpus a user brings. Two of them, so defaults are not tuned to one:

- `numbers`: cardinal numbers 0-99,999 spelled out -> digits ("dreiundvierzig" -> "43")
- `times`: clock times said in words -> 24-hour HH:MM ("a quarter past seven in the evening" -> "19:15");
  about 6,000 distinct sources exist, a small corpus

    python tests/model/user_corpora.py numbers 20000 OUT_DIR   # OUT_DIR/train.tsv, OUT_DIR/valid.tsv
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

# --- numbers ---------------------------------------------------------------------------------

_EN_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
           "sixteen seventeen eighteen nineteen".split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def en(n: int) -> str:
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + ("-" + _EN_ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _EN_ONES[n // 100] + " hundred" + (" and " + en(n % 100) if n % 100 else "")
    return en(n // 1000) + " thousand" + ((" and " if n % 1000 < 100 else " ") + en(n % 1000) if n % 1000 else "")


_FR_ONES = "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize " \
           "dix-sept dix-huit dix-neuf".split()
_FR_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def fr(n: int) -> str:
    if n < 20:
        return _FR_ONES[n]
    if n < 70:
        t, o = divmod(n, 10)
        return _FR_TENS[t] + ("" if o == 0 else " et un" if o == 1 else "-" + _FR_ONES[o])
    if n < 80:
        return "soixante" + (" et onze" if n == 71 else "-" + _FR_ONES[n - 60])
    if n < 100:
        return "quatre-vingts" if n == 80 else "quatre-vingt-" + _FR_ONES[n - 80]
    if n < 1000:
        h, r = divmod(n, 100)
        head = "cent" if h == 1 else _FR_ONES[h] + (" cents" if r == 0 else " cent")
        return head + (" " + fr(r) if r else "")
    k, r = divmod(n, 1000)
    head = "mille" if k == 1 else fr(k).replace("quatre-vingts", "quatre-vingt").replace(" cents", " cent") + " mille"
    return head + (" " + fr(r) if r else "")


_DE_ONES = "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn " \
           "sechzehn siebzehn achtzehn neunzehn".split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()


def de(n: int, *, compound: bool = False) -> str:
    if n < 20:
        return "ein" if compound and n == 1 else _DE_ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return ("ein" if o == 1 else _DE_ONES[o]) + "und" + _DE_TENS[t] if o else _DE_TENS[t]
    if n < 1000:
        h, r = divmod(n, 100)
        return ("ein" if h == 1 else _DE_ONES[h]) + "hundert" + (de(r) if r else "")
    k, r = divmod(n, 1000)
    return de(k, compound=True) + "tausend" + (de(r) if r else "")


_ES_ONES = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis "
            "diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés veinticuatro veinticinco "
            "veintiséis veintisiete veintiocho veintinueve").split()
_ES_TENS = "_ _ _ treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()
_ES_HUNDREDS = ("_ ciento doscientos trescientos cuatrocientos quinientos seiscientos setecientos ochocientos "
                "novecientos").split()


def es(n: int, *, before_mil: bool = False) -> str:
    if n < 30:
        word = _ES_ONES[n]
        return word[:-1] if before_mil and word.endswith("uno") else word
    if n < 100:
        t, o = divmod(n, 10)
        return _ES_TENS[t] + (" y " + es(o, before_mil=before_mil) if o else "")
    if n < 1000:
        if n == 100:
            return "cien"
        h, r = divmod(n, 100)
        return _ES_HUNDREDS[h] + (" " + es(r, before_mil=before_mil) if r else "")
    k, r = divmod(n, 1000)
    return ("mil" if k == 1 else es(k, before_mil=True) + " mil") + (" " + es(r) if r else "")


def numbers_pair(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(100_000) if rng.random() < 0.8 else rng.randrange(1000)
    say = rng.choice((en, fr, de, es))
    text = say(n)
    return (text.capitalize() if rng.random() < 0.2 else text), str(n)


# --- times -----------------------------------------------------------------------------------

def _part_of_day(h: int, words: tuple[str, str, str, str]) -> str:
    """morning / afternoon / evening / night for a 24-hour h."""
    return words[0] if 5 <= h < 12 else words[1] if 12 <= h < 18 else words[2] if 18 <= h < 22 else words[3]


def times_pair(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randrange(24), rng.choice((0, 15, 30, 45) * 3 + tuple(range(60)))
    h12 = h % 12 or 12
    nxt = (h + 1) % 12 or 12
    lang = rng.randrange(4)
    if lang == 0:
        tail = _part_of_day(h, ("in the morning", "in the afternoon", "in the evening", "at night"))
        if m == 0:
            core = f"{en(h12)} o'clock"
        elif m == 15:
            core = f"a quarter past {en(h12)}"
        elif m == 30:
            core = f"half past {en(h12)}"
        elif m == 45:
            core = f"a quarter to {en(nxt)}"
        else:
            core = f"{en(m)} minutes past {en(h12)}" if m < 30 else f"{en(60 - m)} minutes to {en(nxt)}"
        text = f"{core} {tail}"
    elif lang == 1:
        text = f"{fr(h)} heures" + (f" {fr(m)}" if m else "") if rng.random() < 0.5 or m not in (15, 30, 45) else \
            f"{fr(h)} heures " + {15: "et quart", 30: "et demie", 45: "trois quarts"}[m]
        text = text.replace("un heures", "une heure")
    elif lang == 2:
        tail = _part_of_day(h, ("morgens", "nachmittags", "abends", "nachts"))
        text = f"{de(h12)} Uhr" + (f" {de(m)}" if m else "") + f" {tail}"
        text = text.replace("eins Uhr", "ein Uhr")
    else:
        tail = _part_of_day(h, ("de la mañana", "de la tarde", "de la tarde", "de la noche"))
        art = "la" if h12 == 1 else "las"
        hour = "una" if h12 == 1 else es(h12)
        mins = {0: "en punto", 15: "y cuarto", 30: "y media"}.get(m, f"y {es(m)}")
        text = f"{art} {hour} {mins} {tail}"
    return text, f"{h:02d}:{m:02d}"


CORPORA: dict[str, Callable[[random.Random], tuple[str, str]]] = {"numbers": numbers_pair, "times": times_pair}


def write_corpus(name: str, n_train: int, out: Path, *, n_valid: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """Distinct-source pairs: `n_train` to train.tsv and `n_valid` unseen ones to valid.tsv."""
    rng, make = random.Random(seed), CORPORA[name]
    seen: dict[str, str] = {}
    for _ in range(50 * (n_train + n_valid)):  # a corpus smaller than asked rather than a hang
        if len(seen) >= n_train + n_valid:
            break
        source, target = make(rng)
        seen.setdefault(source, target)
    items = list(seen.items())
    if len(items) < n_train + n_valid:
        raise ValueError(f"{name}: only {len(items)} distinct sources exist; ask for fewer")
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.tsv", out / "valid.tsv"
    for path, part in zip(paths, (items[:n_train], items[n_train:])):
        path.write_text("".join(f"{s}\t{t}\n" for s, t in part), encoding="utf-8")
    return paths


if __name__ == "__main__":
    write_corpus(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
