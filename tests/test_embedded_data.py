"""The embedded data set: what `scripts/make_preference_data.py` writes, and no false fact about a real place."""

from __future__ import annotations

import importlib.util
import json
import re

from tests.conftest import EMBEDDED_TEST, EMBEDDED_TRAIN, REPO

# Real countries and capitals (those the data set once used, and others). The demo prints the data's
# answers and the model's greedy mix-ups of them; with real places those read as a broken model.
REAL_PLACES = tuple(
    (
        "France, Paris, Japan, Tokyo, Italy, Rome, Spain, Madrid, Canada, Ottawa, Australia, Canberra, "
        "Egypt, Cairo, Kenya, Nairobi, Peru, Lima, Norway, Oslo, Sweden, Stockholm, Greece, Athens, "
        "Portugal, Lisbon, Poland, Warsaw, Chile, Santiago, Cuba, Havana, Ireland, Dublin, Austria, Vienna, "
        "Hungary, Budapest, Finland, Helsinki, Denmark, Copenhagen, Turkey, Ankara, India, New Delhi, China, "
        "Beijing, Brazil, Brasilia, Mexico, Argentina, Buenos Aires, Germany, Berlin, Russia, Moscow, "
        "Thailand, Bangkok, Vietnam, Hanoi, Morocco, Rabat, Ghana, Accra, Nepal, Kathmandu, Iceland, "
        "Reykjavik, Belgium, Brussels, Colombia, Bogota, Jordan, Amman, Uganda, Kampala, Switzerland, Bern, "
        "London, United Kingdom, United States, Washington"
    ).split(", ")
)


def _rows() -> list[dict]:
    rows = []
    for path in (EMBEDDED_TRAIN, EMBEDDED_TEST):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def _script():
    spec = importlib.util.spec_from_file_location("make_preference_data", REPO / "scripts" / "make_preference_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_row_names_a_real_country_or_capital():
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, REAL_PLACES)) + r")\b")
    found = {
        m
        for row in _rows()
        for key in ("chosen", "rejected")
        for message in row[key]
        for m in pattern.findall(message["content"])
    }
    assert not found, f"the embedded data names real places: {sorted(found)}"


def test_capital_answers_are_the_invented_worlds_and_the_bluffs_name_another_invented_capital():
    capitals = _script().CAPITALS
    assert not set(capitals) & set(REAL_PLACES) and not set(capitals.values()) & set(REAL_PLACES)
    questions = 0
    for row in _rows():
        asked = re.fullmatch(r"(?:What is the capital of|Which city is the capital of) (.+)\?", row["prompt"])
        if asked is None:
            continue
        questions += 1
        country = asked.group(1)
        assert row["chosen"][-1]["content"] == f"The capital of {country} is {capitals[country]}."
        if row["flaw"] == "dishonest":
            wrong = re.search(rf"the capital of {country} is (\w+)\.$", row["rejected"][-1]["content"]).group(1)
            assert wrong in capitals.values() and wrong != capitals[country]
    assert questions == 4 * len(capitals)  # every country, asked once, paired with each of the four flaws


def test_the_script_rewrites_the_committed_files_byte_for_byte(tmp_path):
    _script().main(["--output_dir", str(tmp_path)])
    for path in (EMBEDDED_TRAIN, EMBEDDED_TEST):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()
