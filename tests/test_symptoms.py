"""The symptom table every notebook's diagnosis refers to."""
from __future__ import annotations

import pytest

from course_lib import BOTTLENECKS
from course_lib.symptoms import FIRST_RECIPE, SYMPTOMS, show_symptom_table, symptom_table


def test_every_row_is_complete_and_names_a_bottleneck():
    keys = {"symptom", "first move", "why", "bottleneck", "shown in"}
    for row in SYMPTOMS:
        assert set(row) == keys and all(isinstance(v, str) and v for v in row.values()), row
        assert row["bottleneck"] in BOTTLENECKS
    assert {r["bottleneck"] for r in SYMPTOMS} == set(BOTTLENECKS)
    assert "NaN" in SYMPTOMS[0]["symptom"] and "TrainingDiverged" in SYMPTOMS[0]["symptom"]


def test_the_four_symptoms_of_the_seeds_are_in_the_table():
    text = " ".join(r["symptom"] for r in SYMPTOMS)
    for phrase in ("oscillates", "val loss bottoms out early", "slow but stable", "backbone moves too much"):
        assert phrase in text, phrase


def test_table_filters_by_bottleneck_and_checks_it():
    assert len(symptom_table()) == len(SYMPTOMS)
    assert set(symptom_table("adaptation")["bottleneck"]) == {"adaptation"}
    with pytest.raises(ValueError, match="bottleneck must be None or one of"):
        symptom_table("capacity")


def test_show_renders_the_whole_table_as_html_and_as_text():
    shown = show_symptom_table("regularization")
    html, text = shown._repr_html_(), repr(shown)
    for row in SYMPTOMS:
        if row["bottleneck"] == "regularization":
            assert row["first move"] in text and row["why"] in text  # no "..." truncation
            assert row["first move"] in html
    assert 'style="text-align:left"' in html and "slow but stable" not in html


def test_first_recipe_is_the_strong_baseline():
    assert FIRST_RECIPE == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4}
