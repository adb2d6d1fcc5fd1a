"""The one scope/model matcher (core.matching) that the processor and the edges share."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendstream.core.matching import ModelMatcher, ScopeSet, model_scope_name, scope_matches, template_of

names = st.text(alphabet="abl-./*?[]3", max_size=12)


def test_globs_cover_prefixed_and_versioned_models() -> None:
    dev = ModelMatcher(["llama-3.2-1b", "llama-3.2-3b", "local/*"])
    assert "local/qwen" in dev
    assert "local/" in dev
    assert "local/qwen/2.5:7b" in dev  # * crosses "/"
    assert "llama-3.2-1b" in dev
    assert "llama-3.2-8b" not in dev
    assert "gpt-4o" not in dev
    assert "LOCAL/qwen" not in dev  # case-sensitive, like the processor's lists
    assert "xlocal/qwen" not in dev  # anchored at both ends
    assert dev.describe() == "llama-3.2-1b, llama-3.2-3b, local/*"


def test_only_star_is_special() -> None:
    odd = ModelMatcher(["model[1]", "what?", "a.b"])
    assert "model[1]" in odd and "model1" not in odd
    assert "what?" in odd and "whatx" not in odd
    assert "a.b" in odd and "axb" not in odd
    assert "gpt-4o-2024-08-06" in ModelMatcher(["gpt-4o*"])
    assert "claude-3-5-sonnet-latest" in ModelMatcher(["claude-*-sonnet-*"])


def glob_oracle(model: str, entry: str) -> bool:
    """The rule, spelled out: ``*`` is any run of characters, everything else literal."""
    return re.fullmatch("".join(".*" if c == "*" else re.escape(c) for c in entry), model, re.DOTALL) is not None


@given(model=names, entries=st.lists(names, max_size=4))
def test_a_list_covers_a_model_when_one_entry_does(model: str, entries: list[str]) -> None:
    matcher = ModelMatcher(entries)
    expected = any(glob_oracle(model, entry) for entry in entries)
    assert (model in matcher) is expected
    assert (model in matcher) is expected  # the remembered answer is the same


def test_scope_patterns() -> None:
    assert scope_matches("user:*", "user:u1")
    assert scope_matches("team:web", "team:web")
    assert scope_matches("*", "team:web")
    assert not scope_matches("user:*", "team:u1")
    assert not scope_matches("user:*", "user:")
    assert not scope_matches("team:web", "team:webshop")
    assert not scope_matches("feature:*", "features:x")
    assert template_of("user:u1") == "user:*"


dimensions = st.sampled_from(["team", "user", "feature"])
values = st.text(alphabet="ab*:", max_size=3)
patterns = st.one_of(st.just("*"), st.builds(lambda d, v: f"{d}:{v}", dimensions, values))


@settings(max_examples=500)
@given(patterns=st.lists(patterns, max_size=4), dimension=dimensions, value=values)
def test_a_compiled_scope_set_answers_as_scope_matches_does(patterns: list[str], dimension: str, value: str) -> None:
    scope = f"{dimension}:{value}"
    expected = bool(value) and any(scope_matches(pattern, scope) for pattern in patterns)
    assert ScopeSet(patterns).covers(dimension, value) is expected


def test_a_scope_set_with_a_template_whose_value_has_a_colon() -> None:
    assert ScopeSet(["team::*"]).covers("team", ":x") and not ScopeSet(["team::*"]).covers("team", "x")


@pytest.mark.parametrize(
    ("name", "scope"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("GPT-4O", "gpt-4o"),
        ("  gpt-4o ", "gpt-4o"),
        ("gpt-4o-latest", "gpt-4o"),
        ("gpt-4o:latest", "gpt-4o"),
        ("gpt-4o@2024-08-06", "gpt-4o"),
        ("gpt-4o.2024-08-06", "gpt-4o"),
        ("ｇｐｔ-4o", "gpt-4o"),  # fullwidth letters
        ("openai/gpt-4o", "gpt-4o"),
        ("openai:gpt-4o", "gpt-4o"),
        ("openai//gpt-4o", "gpt-4o"),
        ("openrouter/openai/gpt-4o", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # another model
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4.1", "gpt-4.1"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3.5-sonnet", "claude-3-5-sonnet"),
        ("anthropic/claude-3.5-sonnet", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("vertex_ai/claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("us.anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("apac.anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("us-gov.anthropic.claude-3-5-sonnet-20240620-v1:0", "claude-3-5-sonnet"),
        ("global.anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("anthropic/claude-3.5-sonnet:beta", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-20241022:beta", "claude-3-5-sonnet"),
        ("openai/gpt-4o:nitro", "gpt-4o"),
        ("openai/gpt-4o:free", "gpt-4o"),
        ("litellm_proxy/gpt-4o", "gpt-4o"),
        ("models/gpt-4o", "gpt-4o"),
        ("local/llama-3.2", "local/llama-3.2"),  # not a provider's prefix: a name of its own
        ("llama3:8b", "llama3:8b"),  # a tag that is a size, not an alias
        ("ft:gpt-4o-2024-08-06:acme::abc", "ft:gpt-4o-2024-08-06:acme::abc"),  # a fine-tune is a model of its own
    ],
)
def test_a_model_scope_is_the_model_its_maker_names_whatever_the_spelling(name: str, scope: str) -> None:
    """Attacker sessions passed a spent ``model:`` cap under another spelling of the same model."""
    assert model_scope_name(name) == scope
    assert model_scope_name(scope) == scope  # a scope's own name is its name
