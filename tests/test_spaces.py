from __future__ import annotations

import pickle
from copy import deepcopy

import pytest
from gymnasium.spaces import Text

from coding_gym.spaces import AnyText


def test_contains_any_str_within_bounds():
    space = AnyText(max_length=20)
    assert space.contains("print('é')\t\x00\n")
    assert space.contains("")
    assert space.contains("🙂" * 20)
    assert not space.contains("x" * 21)


@pytest.mark.parametrize("value", [b"print(1)", None, 1, ["print(1)"]])
def test_rejects_non_str(value):
    assert not AnyText(max_length=100).contains(value)


def test_min_length():
    space = AnyText(max_length=5, min_length=2)
    assert not space.contains("a")
    assert space.contains("ab")


def test_is_a_text_space_with_short_repr():
    space = AnyText(max_length=10)
    assert isinstance(space, Text)
    assert repr(space) == "AnyText(min_length=0, max_length=10)"


def test_sample_is_contained_and_seeded():
    a, b = AnyText(max_length=50, seed=3), AnyText(max_length=50, seed=3)
    samples = [a.sample() for _ in range(20)]
    assert samples == [b.sample() for _ in range(20)]
    assert all(a.contains(s) for s in samples)


def test_equality_copy_and_pickle():
    space = AnyText(max_length=7)
    assert space == AnyText(max_length=7)
    assert space != AnyText(max_length=8)
    assert deepcopy(space) == space
    assert pickle.loads(pickle.dumps(space)) == space


def test_sample_is_short_by_default_but_length_can_be_asked():
    space = AnyText(max_length=100_000, seed=0)
    assert max(len(space.sample()) for _ in range(200)) <= 64
    assert len(space.sample(mask=(500, None))) == 500
    assert AnyText(max_length=3, min_length=3, seed=0).sample().__len__() == 3
