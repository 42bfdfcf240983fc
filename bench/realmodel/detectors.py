"""Detectors of an instruction's effect, measured on generated text (no model): each maps one answer to a bool.

Small and explicit on purpose: a benchmark reports the share of answers each flags, with and without the
instruction, and the transfer ratio (after - before) / (instructed - before) of that share.
"""

from __future__ import annotations

import re

# Function words: frequent, short, and (nearly) exclusive to one language. Accents alone would miss French
# written without them; words alone would miss very short answers, so both count.
FRENCH_WORDS = frozenset(
    "le la les un une des du de est et en pour que qui dans sur avec pas ce cette il elle ils elles sont vous "
    "nous je au aux son sa ses leur mais ou donc car très peut être fait plus".split()
)
ENGLISH_WORDS = frozenset(
    "the is and of to a in that it for are with you this be on as can your by or an have from not they more".split()
)
_WORD = re.compile(r"[a-zàâçéèêëîïôûùüÿœæ']+", re.IGNORECASE)
_ACCENTED = re.compile(r"[àâçéèêëîïôûùüÿœ]", re.IGNORECASE)


def is_french(text: str) -> bool:
    """More French than English function words (an accented letter counts as one French word), at least two."""
    words = [w.strip("'").lower() for w in _WORD.findall(text)]
    french = sum(w in FRENCH_WORDS for w in words) + min(len(_ACCENTED.findall(text)), 3)
    english = sum(w in ENGLISH_WORDS for w in words)
    return french >= 2 and french > english


def share(detector, texts: list[str]) -> float:
    return sum(map(detector, texts)) / len(texts) if texts else float("nan")


def transfer_ratio(before: float, after: float, instructed: float) -> float:
    """How much of the instruction's effect on a share shows without it after training (1: all; nan: no effect)."""
    effect = instructed - before
    return (after - before) / effect if effect else float("nan")
