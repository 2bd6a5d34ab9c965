"""Mixture: deterministic from the seed, proportions follow the weights, resumes exactly."""

import pytest

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.mixture import Mixture
from bidirlm_pl.data.sources import SourceSpec, TextSource


def _source(name, n, weight, streaming=False):
    docs = [f"{name}-{i}" for i in range(n)]
    spec = SourceSpec(name=name, kind="text", weight=weight)
    if streaming:
        return TextSource(spec, iterate=lambda: iter(docs))
    return TextSource(spec, docs=docs)


def _sources(streaming=False):
    return [_source("en", 50, 0.8), _source("code", 7, 0.15, streaming), _source("math", 3, 0.05)]


def test_same_seed_same_stream_other_seed_other_stream():
    a = [Mixture(_sources(), seed=1).next() for _ in range(1)]
    m1, m2, m3 = Mixture(_sources(), seed=1), Mixture(_sources(), seed=1), Mixture(_sources(), seed=2)
    s1 = [m1.next() for _ in range(300)]
    assert s1 == [m2.next() for _ in range(300)]
    assert s1 != [m3.next() for _ in range(300)]
    assert a[0] == s1[0]


def test_realised_proportions_follow_weights():
    mix = Mixture(_sources(), seed=0)
    for _ in range(4000):
        mix.next()
    props = mix.proportions()
    for name, weight in (("en", 0.8), ("code", 0.15), ("math", 0.05)):
        assert abs(props[name]["documents"] - weight) < 0.02, props
        assert props[name]["weight"] == pytest.approx(weight)


def test_each_pass_over_a_source_is_a_permutation():
    mix = Mixture([_source("only", 10, 1.0)], seed=0)
    first, second = [mix.next()[1] for _ in range(10)], [mix.next()[1] for _ in range(10)]
    assert sorted(first) == sorted(second) == sorted(f"only-{i}" for i in range(10))
    assert first != second  # a fresh permutation each pass


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_mid_stream_gives_the_same_next_documents(streaming):
    mix = Mixture(_sources(streaming), seed=3)
    for _ in range(123):
        mix.next()
    state = mix.state_dict()
    expected = [mix.next() for _ in range(200)]
    fresh = Mixture(_sources(streaming), seed=3)
    fresh.load_state_dict(state)
    assert [fresh.next() for _ in range(200)] == expected
    assert fresh.documents == mix.documents


@pytest.mark.parametrize("weights, message", [
    ([1.0, -0.5, 1.0], "weight of source 'code' is -0.5"),
    ([0.0, 0.0, 0.0], "sum to 0.0; expected a positive sum"),
    ([1.0, float("nan"), 1.0], "weight of source 'code' is nan"),
])
def test_bad_weights_fail_with_one_line(weights, message):
    sources = _sources()
    for s, w in zip(sources, weights):
        s.spec.weight = w
    with pytest.raises(BidirLMError, match=message) as err:
        Mixture(sources)
    assert "\n" not in str(err.value)


def test_empty_source_and_no_sources():
    with pytest.raises(BidirLMError, match="source 'none' has no documents"):
        Mixture([_source("none", 0, 1.0)]).next()
    with pytest.raises(BidirLMError, match="no sources"):
        Mixture([])
    with pytest.raises(BidirLMError, match="not unique"):
        Mixture([_source("a", 2, 1.0), _source("a", 2, 1.0)])
