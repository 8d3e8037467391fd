"""Glob patterns over parameter names: fnmatch's case-sensitive rules, where ``*`` crosses dots."""

from __future__ import annotations

import pytest

from finetune.patterns import matches_any, unmatched_patterns

NAMES = [
    "conv1.weight",
    "layer1.0.conv1.weight",
    "layer1.0.bn1.bias",
    "layer2.0.conv1.weight",
    "layer3.1.conv2.weight",
    "fc.weight",
    "fc.bias",
]


@pytest.mark.parametrize(
    "pattern, matched",
    [
        ("fc.*", ["fc.weight", "fc.bias"]),
        ("layer1.*", ["layer1.0.conv1.weight", "layer1.0.bn1.bias"]),  # `*` crosses dots
        ("layer[12].*", ["layer1.0.conv1.weight", "layer1.0.bn1.bias", "layer2.0.conv1.weight"]),
        ("layer[!1]*", ["layer2.0.conv1.weight", "layer3.1.conv2.weight"]),
        ("*.bias", ["layer1.0.bn1.bias", "fc.bias"]),
        (
            "layer?.?.conv?.weight",
            ["layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer3.1.conv2.weight"],
        ),
        ("fc.weight", ["fc.weight"]),  # no wildcard: the exact name only
        ("conv1.*", ["conv1.weight"]),  # not layer1.0.conv1.weight: a pattern is anchored
    ],
)
def test_matches_any(pattern, matched):
    assert [name for name in NAMES if matches_any(name, [pattern])] == matched


def test_dots_are_literal():
    assert not matches_any("fcXweight", ["fc.weight"])
    assert matches_any("fc.weight", ["fc?weight"])  # `?` stands for any one character


def test_matching_is_case_sensitive():
    assert not matches_any("FC.weight", ["fc.*"])
    assert not matches_any("fc.weight", ["FC.*"])


def test_matches_any_of_several_and_of_none():
    assert matches_any("fc.bias", ["head.*", "fc.*"])
    assert not matches_any("fc.bias", [])
    assert matches_any("fc.bias", iter(["fc.*"]))  # any iterable


def test_unmatched_patterns_reports_the_typos_in_order():
    patterns = ["fc.*", "layer5.*", "Layer1.*", "layer[12].*", "head.*"]
    assert unmatched_patterns(patterns, NAMES) == ["layer5.*", "Layer1.*", "head.*"]
    assert unmatched_patterns(["fc.*"], iter(NAMES)) == []  # names read more than once
    assert unmatched_patterns(["fc.*"], []) == ["fc.*"]
    assert unmatched_patterns([], NAMES) == []
