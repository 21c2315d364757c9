"""Caption rules: each one optional, each a pure function of the captions that says which samples it rejects.

The rules follow the cleaning of T5's C4 corpus (Raffel et al. 2020, section 2.2: pages with "lorem ipsum", curly
brackets, "javascript", or terms-of-use / privacy / cookie notices were dropped) adapted to alt-text, ALIGN's
frequency rule (Jia et al. 2021: alt-texts shared by more than 10 images are boilerplate) and a length bound in
words. Language identification is langid.py's (Lui & Baldwin 2012), whose model ships inside the package.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlpretrain.errors import ConfigError

# C4's phrases, plus what marks an alt-text as not describing the image (file names, links, placeholders)
BOILERPLATE = re.compile(
    r"lorem ipsum|javascript|[{}]|terms of use|privacy policy|cookie policy|uses cookies|use of cookies"
    r"|click here|https?://|www\.|\.(jpe?g|png|gif|webp|bmp)\b|^(img|dsc|image|photo|untitled)[\s_-]*\d*$"
    r"|^(no|missing) (image|alt)|^(image|picture|photo|untitled|thumbnail|placeholder)$", re.IGNORECASE)


@dataclass(frozen=True)
class CaptionRules:
    """Which rules run: None (or False) leaves a rule out.

    min_words / max_words: bounds on the caption's words; languages: langid codes to keep (e.g. ("en",));
    max_repeats: captions shared by more than this many samples are dropped (ALIGN used 10); boilerplate: C4-like
    phrases and alt-text placeholders; max_repeated_words: the fraction of a caption's words (of 4 or more) that
    repeat an earlier word, above which it is dropped ("shoes shoes shoes shoes").
    """

    min_words: int | None = None
    max_words: int | None = None
    languages: tuple[str, ...] | None = None
    max_repeats: int | None = None
    boilerplate: bool = False
    max_repeated_words: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_words", "max_words", "max_repeats"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name}: must be >= 0, got {v}")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ConfigError(f"min_words {self.min_words} > max_words {self.max_words}")
        if self.max_repeated_words is not None and not 0 <= self.max_repeated_words <= 1:
            raise ConfigError(f"max_repeated_words: a fraction in [0, 1], got {self.max_repeated_words}")
        if self.languages is not None and not self.languages:
            raise ConfigError("languages: give at least one language code (e.g. en)")


def normalize(caption: str) -> str:
    """Lower case, words only, single spaces: how captions are compared for repeats."""
    return " ".join(re.findall(r"\w+", caption.lower()))


def words(caption: str) -> list[str]:
    """A caption's words (runs of letters and digits)."""
    return re.findall(r"\w+", caption)


def languages(captions: Sequence[str]) -> list[str]:
    """langid's language code of each caption (empty captions: "")."""
    import langid

    return [langid.classify(c)[0] if c.strip() else "" for c in captions]


def repeated_word_fraction(caption: str) -> float:
    """The fraction of words that repeat an earlier word of the same caption (0 below four words)."""
    w = [x.lower() for x in words(caption)]
    return 0.0 if len(w) < 4 else 1 - len(set(w)) / len(w)


def apply_rules(captions: Sequence[str], rules: CaptionRules, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{rule name: bool [n], True where the rule rejects the caption}, for the rules that are on.

    `valid` marks the rows that are samples (others are neither counted nor compared for repeats).
    """
    n = len(captions)
    valid = np.ones(n, dtype=bool) if valid is None else valid
    out: dict[str, np.ndarray] = {}
    if rules.min_words is not None or rules.max_words is not None:
        count = np.array([len(words(c)) for c in captions], dtype=np.int64)
        lo = rules.min_words if rules.min_words is not None else 0
        hi = rules.max_words if rules.max_words is not None else np.iinfo(np.int64).max
        out["length"] = (count < lo) | (count > hi)
    if rules.languages is not None:
        keep = set(rules.languages)
        out["language"] = np.array([lang not in keep for lang in languages(captions)], dtype=bool)
    if rules.max_repeats is not None:
        norm = [normalize(c) for c in captions]
        freq = Counter(t for t, ok in zip(norm, valid) if ok)
        out["repeated"] = np.array([freq[t] > rules.max_repeats for t in norm], dtype=bool)
    if rules.boilerplate:
        out["boilerplate"] = np.array([BOILERPLATE.search(c.strip()) is not None for c in captions], dtype=bool)
    if rules.max_repeated_words is not None:
        out["repetitive"] = np.array([repeated_word_fraction(c) > rules.max_repeated_words for c in captions],
                                     dtype=bool)
    return {k: v & valid for k, v in out.items()}
