"""The complexity classifier: accuracy on the labelled sample, signals, override header, no text in its output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.gateway.complexity import (
    SIGNALS,
    ComplexityHeaderError,
    Tier,
    assess,
    literal_trie_pattern,
    parse_header,
)

DATA = Path(__file__).resolve().parent / "data" / "complexity_labelled.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy(rows: list[dict[str, Any]]) -> float:
    return sum(assess(r["body"]).tier.value == r["label"] for r in rows) / len(rows)


def test_sample_is_large_and_balanced_enough() -> None:
    labels = [r["label"] for r in ROWS]
    assert len(ROWS) >= 300
    assert all(labels.count(t.value) >= 60 for t in Tier)


def test_accuracy_on_the_labelled_sample() -> None:
    # Measured: 92.3% on all 351 rows, 93.3% on the 45 holdout rows never used for tuning.
    assert accuracy(ROWS) >= 0.90
    assert accuracy([r for r in ROWS if r.get("split") == "holdout"]) >= 0.88


def test_never_off_by_two_tiers_on_the_sample() -> None:
    order = [t.value for t in Tier]
    worst = max(abs(order.index(assess(r["body"]).tier.value) - order.index(r["label"])) for r in ROWS)
    assert worst <= 1


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


def test_simple_medium_complex_examples() -> None:
    assert assess(user("What is the capital of France?")).tier is Tier.simple
    assert assess(user("Explain how a hash map works and when it degrades to linear time.")).tier is Tier.medium
    hard = "Design a multi-region database with strong consistency; justify the trade-offs and failure modes."
    assert assess(user(hard)).tier is Tier.complex


def test_signals_fire() -> None:
    body = user(
        "Refactor this and prove it terminates:\n```python\ndef f(n):\n    return f(n - 1)\n```\n"
        "1. keep the API\n2. add tests\n3. then benchmark it\n4. finally document it",
        max_tokens=4000,
        tools=[{"type": "function", "function": {"name": "run"}}],
    )
    signals = set(assess(body).signals)
    assert {"code_block", "debugging", "strong_reasoning", "multi_step", "long_output", "tools"} <= signals
    assert signals <= set(SIGNALS)


def test_long_pasted_text_with_a_mechanical_ask_stays_cheap() -> None:
    doc = "The council will repair the bridge on Monday and the road stays closed until Friday. " * 60
    translated = assess(user("Translate this into French:\n\n" + doc))
    assert translated.tier is Tier.simple and "bulk_text" in translated.signals
    analysed = assess(user("Analyse the risks and propose a strategy with trade-offs for:\n\n" + doc))
    assert analysed.tier is Tier.complex


def test_anthropic_body_with_system_and_blocks() -> None:
    body = {
        "model": "claude-3-5-sonnet",
        "system": [{"type": "text", "text": "You are a distributed systems expert."}],
        "max_tokens": 3000,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Design a consensus protocol and prove safety."}]}
        ],
    }
    a = assess(body)
    assert a.tier is Tier.complex and a.output_tokens == 3000


def test_legacy_completions_prompt() -> None:
    assert assess({"model": "x", "prompt": "Prove that sqrt(2) is irrational, formally."}).tier is not Tier.simple


@pytest.mark.parametrize(("value", "tier"), [("simple", Tier.simple), (" Complex ", Tier.complex), (None, None)])
def test_header_parsing(value: str | None, tier: Tier | None) -> None:
    assert parse_header(value) is tier


def test_header_overrides_the_classifier() -> None:
    a = assess(user("hi"), header="complex")
    assert (a.tier, a.source, a.signals) == (Tier.complex, "header", ())


def test_bad_header_is_a_clear_error() -> None:
    with pytest.raises(ComplexityHeaderError, match="must be one of simple, medium, complex"):
        assess(user("hi"), header="hard")


def test_token_estimates() -> None:
    a = assess(user("x" * 4000, max_completion_tokens=123))
    assert a.input_tokens == 1000 + 4 and a.output_tokens == 123
    assert assess(user("x", max_tokens=True)).output_tokens is None


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    ),
    st.text(max_size=200),
)
def test_any_body_shape_is_classified_and_no_text_comes_back(junk: Any, secret: str) -> None:
    body = {"messages": [{"role": "user", "content": secret}, junk, {"role": "user", "content": junk}], "tools": junk}
    a = assess(body)
    assert a.tier in Tier and a.source == "classifier"
    assert set(a.signals) <= set(SIGNALS)
    # Every string it returns comes from a fixed vocabulary, so no prompt text can come back.
    vocabulary = {t.value for t in Tier} | set(SIGNALS) | {"classifier", "header"}
    returned = [a.tier.value, a.source, *a.signals]
    assert set(returned) <= vocabulary
    assert all(isinstance(v, int | type(None)) for v in (a.score, a.input_tokens, a.output_tokens))
    assert isinstance(assess({"messages": junk}).tier, Tier)


@given(
    words=st.lists(st.text(alphabet="ab ,\\$(", min_size=1, max_size=6), min_size=1, max_size=12),
    text=st.text(alphabet="ab ,\\$(x", max_size=40),
)
def test_phrase_trie_finds_exactly_what_the_plain_alternation_finds(words: list[str], text: str) -> None:
    trie = re.compile(literal_trie_pattern(words))
    plain = re.compile("|".join(re.escape(w) for w in words))
    assert bool(trie.search(text)) == bool(plain.search(text)) == any(w in text for w in words)
