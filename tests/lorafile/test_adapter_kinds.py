"""Which adapter kinds a module carries, from its role names alone (asked once per set of names)."""

from __future__ import annotations

import pytest

from client.lorafile.adapters import kinds_present


@pytest.mark.parametrize(
    ("roles", "kinds"),
    [
        ({"down", "up", "alpha"}, ["lora"]),
        ({"down", "up", "mid", "alpha"}, ["lora"]),
        ({"down", "up", "dora_scale"}, ["lora", "dora"]),
        ({"down", "up", "diff_b", "up_bias"}, ["lora", "up_bias", "bias_diff"]),
        ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, ["loha"]),
        ({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, ["lokr"]),
        ({"diff", "diff_b"}, ["full_diff", "bias_diff"]),
        ({"set_weight"}, ["set_weight"]),
        ({"alpha"}, []),
        ({"lokr_w1", "down", "up"}, ["lokr", "lora"]),  # two primaries: module_terms refuses the module
    ],
)
def test_kinds_follow_the_role_names_in_registry_order(roles, kinds):
    assert [a.kind for a in kinds_present(frozenset(roles))] == kinds


def test_a_set_of_role_names_is_answered_once():
    kinds_present.cache_clear()
    first = kinds_present(frozenset({"down", "up", "alpha"}))
    again = kinds_present(frozenset({"alpha", "up", "down"}))
    assert again is first
    assert kinds_present.cache_info().hits == 1
