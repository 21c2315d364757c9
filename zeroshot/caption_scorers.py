"""Captioning metrics: generated captions scored against their references (COCO style, several per image) with
pycocoevalcap's own scorers, so the numbers are those of the COCO caption evaluation code on the same captions.

BLEU-1..4, ROUGE-L and CIDEr (CIDEr-D, its document frequencies taken from the evaluated references) are always
computed. METEOR only where `java` is on PATH: its scorer is a Java program. SPICE is left out: it downloads
Stanford CoreNLP models on first use, and nothing here downloads. `left_out()` says which are missing and why.

Captions are tokenized as the COCO evaluation does: Stanford's PTB tokenizer, lower-cased, punctuation tokens
removed (pycocoevalcap's PTBTokenizer, Java too). Without Java, `python_tokenize` stands in: the same tokens on
plain captions (words, numbers, commas, full stops, contractions, brackets), not on every rare construct of
the Stanford tokenizer (such as "gonna" -> "gon na").
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from vlpretrain.errors import ConfigError, DataError

K = TypeVar("K", bound=Hashable)

# pycocoevalcap's PTBTokenizer drops exactly these tokens after tokenizing (its PUNCTUATIONS list)
PUNCTUATION_TOKENS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                                "-", "--", "...", ";"])
SPICE_REASON = "SPICE downloads Stanford CoreNLP models on first use (nothing here downloads)"
METEOR_REASON = "no java on PATH (METEOR's scorer is a Java program: apt-get install default-jre-headless)"


def java_available() -> bool:
    """Whether a `java` executable is on PATH (METEOR and the PTB tokenizer need one)."""
    return shutil.which("java") is not None


def left_out(meteor: bool | None = None) -> dict[str, str]:
    """The COCO caption metrics `caption_metrics(..., meteor=meteor)` does not report here, each with the reason."""
    if meteor is False:
        return {"meteor": "not asked for", "spice": SPICE_REASON}
    return ({} if java_available() else {"meteor": METEOR_REASON}) | {"spice": SPICE_REASON}


# The Stanford tokenizer's treatment of what captions hold: brackets become -LRB- etc. (lower-cased with the rest,
# so they are not among PUNCTUATION_TOKENS and stay), quotes become `` and '', clitics ('s, n't, ...) are split
# off, and a full stop leaves a word's end unless the word is an abbreviation ("u.s.", "p.m.", "mr.").
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc mt ave co inc ltd no".split())
_CLITICS = re.compile(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b", re.IGNORECASE)
_TOKEN = re.compile(r"""\.\.\.|--|[?!]+|[()\[\]{};"`$%+&]|n't\b|'(?:s|re|ve|ll|d|m)\b|'|[^\s()\[\]{};"`$%+&'?!]+""",
                    re.IGNORECASE)


def _split_word(word: str) -> list[str]:
    """A word with its trailing commas, colons and sentence-ending full stop as separate tokens."""
    tail: list[str] = []
    while word and (word.endswith("...") or word[-1] in ",:"):
        cut = 3 if word.endswith("...") else 1
        tail.insert(0, word[-cut:])
        word = word[:-cut]
    if word.endswith(".") and "." not in word[:-1] and word[:-1].lower() not in _ABBREVIATIONS and len(word) > 1:
        tail.insert(0, ".")
        word = word[:-1]
    return ([word] if word else []) + tail


def python_tokenize(caption: str) -> str:
    """PTB-style tokens of one caption, lower-cased, punctuation tokens removed, joined by spaces (what
    pycocoevalcap's PTBTokenizer gives for plain captions, without Java)."""
    tokens: list[str] = []
    for piece in _TOKEN.findall(_CLITICS.sub(r"\1 \2", caption.replace("\n", " "))):
        if piece in _BRACKETS:
            tokens.append(_BRACKETS[piece].lower())
        elif piece in ('"', "'"):
            tokens.append("''")
        else:
            tokens.extend(_split_word(piece))
    return " ".join(t for t in (t.lower() for t in tokens) if t not in PUNCTUATION_TOKENS)


def tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """Every caption tokenized as the COCO evaluation does (PTBTokenizer with Java, else `python_tokenize`)."""
    if not java_available():
        return {k: [python_tokenize(c) for c in caps] for k, caps in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one Java run for everything; a caption with only blanks would leave no line, so it is a lone space
    return PTBTokenizer().tokenize({k: [{"caption": c if c.strip() else " "} for c in caps]
                                    for k, caps in captions.items()})


def coco_scores(references: Mapping[K, list[str]], predictions: Mapping[K, list[str]],
                meteor: bool | None = None) -> dict[str, float]:
    """pycocoevalcap's corpus scores of tokenized captions ({id: [one prediction]} against {id: [references]}):
    bleu_1..bleu_4, rouge_l, cider, and meteor when `meteor` (default: when Java is available)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(references, predictions, verbose=0)
    scores = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}
    scores["rouge_l"] = float(Rouge().compute_score(references, predictions)[0])
    scores["cider"] = float(Cider().compute_score(references, predictions)[0])
    if meteor is not False and java_available():  # asked for without Java, it is left out as left_out() says
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java process, ended when the scorer is collected
        scores["meteor"] = float(scorer.compute_score(references, predictions)[0])
        del scorer
    return scores


def caption_metrics(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]],
                    meteor: bool | None = None) -> dict[str, float]:
    """COCO caption metrics of one generated caption per id against that id's reference captions.

    Returns bleu_1, bleu_2, bleu_3, bleu_4, rouge_l, cider and meteor: pycocoevalcap's corpus-level scores on the
    tokenized captions (see the module docstring). METEOR needs Java; `meteor=False` leaves it out even then (its
    scorer takes some 20 s to load its paraphrase table). `left_out(meteor)` names what is missing and why.
    """
    if not predictions:
        raise DataError("caption metrics: no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise DataError(f"caption metrics: prediction {missing[0]!r} has no references ({len(missing)} such)")
    empty = [k for k in predictions if not [r for r in references[k] if r.strip()]]
    if empty:
        raise DataError(f"caption metrics: image {empty[0]!r} has no reference caption ({len(empty)} such)")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise ConfigError(f"caption metrics: prediction {k!r} is a {type(p).__name__}, not a caption string")
    ids = list(predictions)
    tokens = tokenize({**{("ref", k): [r for r in references[k] if r.strip()] for k in ids},
                       **{("pred", k): [predictions[k]] for k in ids}})
    return coco_scores({k: tokens[("ref", k)] for k in ids}, {k: tokens[("pred", k)] for k in ids}, meteor=meteor)
