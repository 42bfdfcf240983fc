"""How much of the French the real-model benchmark counts is French: a stricter look at its detector's answers.

    python -m bench.realmodel.languages            # every run in bench/realmodel/work/ that kept its adapter

`detectors.is_french` counts French function words, and Spanish, Portuguese and Italian share several of them
("la", "de", "que", "en", "il"): a degenerate answer such as "La lucha para personas está fácil para todos." or
"Pagina dei perdusi e perdutamento di vita, il cibo di vita è uno dei motivi" passes. This
regenerates each kept run's greedy answers to the held-out questions without the instruction (as `measure.py`
does), stops unless the benchmark's detector gives the share the run recorded, and counts the flagged answers
that read as Spanish, Portuguese or Italian instead (as many of their own function words and accents as of
French's own). Every share in the table is of all 40 answers.
The instructed base model's answers (`base.json`) are checked the same way. Only runs trained on this machine
keep an adapter; the others were restored from results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.realmodel.detectors import FRENCH_WORDS, is_french  # noqa: E402

# The detector's French words that Spanish, Portuguese or Italian use too, and accents French shares with them.
SHARED_WORDS = frozenset("la de que en un il son sa se ou".split())
FRENCH_ONLY_ACCENTS = re.compile(r"[âçéêëîïôûœæ]", re.IGNORECASE)
# Function words of Spanish, Portuguese and Italian that French does not use; accents French does not write.
OTHER_WORDS = frozenset(
    "el los las una para por con del muy pero como esta este esto puede más está también "  # Spanish
    "não uma os ao em com são é muito você isso "  # Portuguese
    "di dei della delle che è uno per sono gli questo questa anche molto più".split()  # Italian
)
OTHER_ACCENTS = re.compile(r"[áíóúñãõìò]", re.IGNORECASE)
# Words with every letter of the four languages (the detector's own pattern lacks á ñ ã ...: "está" read as "est").
_WORD = re.compile(r"[a-zàâçéèêëîïôûùüÿœæáíóúñãõìò']+", re.IGNORECASE)


def reads_other_romance(text: str) -> bool:
    """Some Spanish, Portuguese or Italian, and at least as much as French, each counted by its own words (not
    the ones they share) and accents (up to 3)."""
    words = [w.strip("'").lower() for w in _WORD.findall(text)]
    french = sum(w in FRENCH_WORDS - SHARED_WORDS for w in words) + min(len(FRENCH_ONLY_ACCENTS.findall(text)), 3)
    other = sum(w in OTHER_WORDS for w in words) + min(len(OTHER_ACCENTS.findall(text)), 3)
    return other > 0 and other >= french


def split_shares(answers: list[str]) -> tuple[float, float]:
    """(share of the answers the benchmark's detector flags French, share of the answers flagged so that read as
    Spanish, Portuguese or Italian): both shares of all the answers."""
    flagged = [a for a in answers if is_french(a)]
    return len(flagged) / len(answers), sum(map(reads_other_romance, flagged)) / len(answers)


def main(argv: list[str] | None = None) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.realmodel import measure
    from bench.realmodel.run import MAX_NEW_TOKENS, WORK, held_out_questions
    from preference_dpo.presets import resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args(argv)
    model_dir = resolve(args.model, "--model")
    questions = held_out_questions()
    base = json.loads((args.work / "base.json").read_text())
    rows = [("instructed base model", "-", *split_shares(base["reference_answers"]["french"]), None)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = measure.chat_texts(tokenizer, questions, None)
    for folder in sorted(args.work.glob("*_seed*")):
        if not (folder / "adapter").is_dir() or not (folder / "result.json").exists():
            continue
        result = json.loads((folder / "result.json").read_text())
        if result["greedy"]["french"] == 0.0:  # nothing flagged: a stricter check flags nothing either
            continue
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, folder / "adapter").merge_and_unload().eval()
        answers = measure.generate(model, tokenizer, texts, MAX_NEW_TOKENS)
        rows.append((result["arm"], result["seed"], *split_shares(answers), result["greedy"]["french"]))
        if abs(rows[-1][2] - rows[-1][4]) > 1e-9:  # not the answers the run was measured on
            raise SystemExit(
                f"{folder}: the detector flags {rows[-1][2]:.3f} of the regenerated answers French, the "
                f"run recorded {rows[-1][4]:.3f}; regenerate on the machine that trained it."
            )
    print("| answers | seed | flagged French | flagged, but Spanish, Portuguese or Italian | French | recorded |")  # noqa: T201
    print("|---|---|---|---|---|---|")  # noqa: T201
    for name, seed, flagged, other, recorded in rows:
        shown = "-" if recorded is None else f"{recorded:.3f}"
        print(f"| {name} | {seed} | {flagged:.3f} | {other:.3f} | {flagged - other:.3f} | {shown} |")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
