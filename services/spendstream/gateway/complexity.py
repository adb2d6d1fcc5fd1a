"""Task-complexity classifier: a small local heuristic over an OpenAI or Anthropic request body.

It reads the prompt text in memory only, within the gateway, and returns a tier, an integer score, the NAMES of
the signals that fired and token estimates: never any text, so nothing it returns can leak a prompt into events,
logs or metrics. No network, no model: a few regular expressions over a bounded window of text (the last user
message and the system prompt), so its cost does not grow with pasted documents.

Score (points, summed; the names of the signals that fired are returned, see ``SIGNALS``):

- ``length`` of what is asked now (last user message + system prompt), one point per step passed at 10, 20, 40,
  80 and 200 words; ``bulk_text``: a long text under a mechanical ask (translate, summarise, extract) counts 1,
  because length alone is not difficulty;
- ``task``: a generative or explanatory ask (explain, write, compare, how does ...) +2; ``brief`` ("short",
  "one line") -1; ``simple_ask`` (translate, yes/no, what is the capital, fix the typo) -2;
- ``strong_reasoning`` (prove, derive, design a, trade-offs, root cause, distributed, ...) +2 each, at most 4;
  ``reasoning`` (analyse, evaluate, optimise, step by step, propose, ...) +1 each, at most 2;
- ``many_requirements``: 4+ commas/semicolons +1, 8+ +2; ``multi_step``: a list of 3+ items +1, 5+ +2;
  ``sequence_words`` ("then ... finally") +1;
- ``code_block`` (fenced) +2 or ``code_lines`` +1; ``debugging`` +1; ``math`` +2 (+3 with strong reasoning:
  proofs and derivations must be argued, not looked up);
- ``long_output``: ``max_tokens`` >= 800 +1, >= 2000 +2, or "detailed", "essay", "2000 words" +1;
- ``conversation`` (6+ messages or much earlier context) +1; ``tools`` offered +1; ``reasoning_effort: high`` +2.

Tier: score <= ``SIMPLE_MAX`` is simple, <= ``MEDIUM_MAX`` medium, else complex. The thresholds were set on
``tests/data/complexity_labelled.jsonl`` (accuracy reported by ``bench/bench_routing.py``).

A client that knows better sends ``X-Spendstream-Complexity: simple|medium|complex``; it wins over the heuristic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Any, NamedTuple

HEADER = "X-Spendstream-Complexity"
SIMPLE_MAX = 1
MEDIUM_MAX = 4
# Keyword scans read at most this many characters of the last user message and of the system prompt.
SCAN_CHARS = 6000
CHARS_PER_TOKEN = 4  # the usual English average; estimates only feed cost estimates, never billing
TOKENS_PER_MESSAGE = 4


class Tier(StrEnum):
    """Task complexity tiers, cheapest first; the routing section of the policy names the same three."""

    simple = "simple"
    medium = "medium"
    complex = "complex"


TIER_ORDER: tuple[Tier, ...] = (Tier.simple, Tier.medium, Tier.complex)


class ComplexityHeaderError(ValueError):
    """The override header holds something other than simple, medium or complex."""


class Assessment(NamedTuple):
    """What the classifier found: no prompt text, only a tier, a score, signal names and token estimates."""

    tier: Tier
    score: int
    source: str  # "header" or "classifier"
    signals: tuple[str, ...]
    input_tokens: int
    output_tokens: int | None  # the request's own limit, if it set one


_FLAGS = re.IGNORECASE | re.MULTILINE
# Keyword signals are counted over lower-cased words (one dict lookup per word) and phrases (str.count), which is
# several times faster than one regular expression per signal over the same text.
_KEYWORDS = {
    "strong": "prove proves proving proof proofs derive derives deriving derivation tradeoff tradeoffs trade-off "
    "trade-offs architecture architectures architectural architect formally rigorous rigorously justify "
    "concurrency consistency distributed full-stack",
    "reasoning": "analyse analyze analysis analyses evaluate critique optimise optimize optimising optimizing "
    "strategy strategic implication implications complexity comprehensive diagnose diagnosing diagnosis "
    "assumptions sensitivity propose recommend recommendation recommendations estimate in-depth step-by-step",
    "debug": "debug debugging stacktrace traceback refactor refactoring deadlock deadlocks segfault",
    "math": "integral derivative eigenvalue eigenvalues eigenvector theorem lemma probability solve solutions "
    "solution variance matrix polynomial modulo induction converge converges convergence asymptotic",
    "sequence": "then next finally afterwards lastly",
    "long": "detailed thorough essay report whitepaper long-form",
    "brief": "short one-line briefly",
}
_GROUP_OF_WORD = {word: group for group, words in _KEYWORDS.items() for word in words.split()}
_PHRASES = {
    "strong": (
        "design a ", "design an ", "design the ", "root cause", "threat model", "formal proof",
        "formal specification", "formal argument", "formal derivation", "scale to", "scale for", "scalable to",
        "scaling to", "scaling for", "from scratch", "complete implementation", "end-to-end", "end to end",
    ),
    "reasoning": (
        "step by step", "reason about", "reason through", "reasoning about", "reasoning through",
        "compare and contrast", "edge case", "in depth", "explain why", "explain how", "failure mode",
    ),
    "debug": ("stack trace", "race condition", "memory leak"),
    "math": ("expected value", "differential equation", "show that", "prove that"),
    "sequence": ("after that", "first,", "second,", "third,"),
    "long": (
        "full implementation", "full program", "full report", "several pages", "multiple pages",
        "several paragraphs", "multiple paragraphs", "several sections", "multiple sections",
    ),
    "brief": ("one line", "one word", "in one sentence", "a few words"),
}  # fmt: skip


def literal_trie_pattern(words: Iterable[str]) -> str:
    """A regular expression matching any of ``words``, as a trie of their characters: ``re`` tries alternatives one
    by one at every position, so shared prefixes make it about three times faster than ``a|b|c``."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(rest) for char, rest in sorted(node.items()) if char]
        if not branches:
            return ""
        ends_here = "" in node
        if len(branches) == 1 and not ends_here:
            return branches[0]
        return "(?:" + "|".join(branches) + ")" + ("?" if ends_here else "")

    return pattern(trie)


# Any phrase at all? One search answers that for a short text faster than counting each phrase; a long text is
# counted directly (str.count is faster than the regular expression there).
_ANY_PHRASE = re.compile(literal_trie_pattern(p for phrases in _PHRASES.values() for p in phrases))
_PHRASE_GATE_CHARS = 600
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in ',.;:!?()[]{}"`*#<>=/\\|“”'})
_MATH_SYMBOLS = re.compile(
    literal_trie_pattern(("\\frac", "\\sum", "\\int", "\\sqrt", "\\mathbb", "∫", "∑", "√", "≤", "≥", "∀", "∃"))
)
_DOLLAR_MATH = re.compile(r"\$[^$\n]{1,80}\$")
_EQUATION = re.compile(r"\d\s*[\^*/]\s*\d+\s*[-+*/^=]\s*\d")
_WORD_COUNT = re.compile(r"\d{3,5}[- ]words?\b")
_UNDER_WORDS = re.compile(r"\bunder \d+ words\b")
_CODE_STARTS = (
    "def ", "class ", "import ", "from ", "function ", "const ", "let ", "var ", "public ", "private ",
    "#include", "SELECT ", "for (", "if (", "return ", "fn ", "func ", "package ", "}",
)  # fmt: skip
_CODE_MARKERS = ("Traceback", "Exception", "error:")
_LIST_ITEM = re.compile(r"^\s*(\d+[.)]|[-*•]|[a-z][.)])\s+\S", re.MULTILINE)
_SIMPLE_ASK = re.compile(
    r"^\s*(translate|what is the capital|what's the capital|yes or no|one word|fix (the |this )?typo|"
    r"correct the spelling|how do you spell|define\b|synonym|antonym|convert \d|what time|what day|"
    r"hi\b|hello\b|thanks|thank you|classify the sentiment|is this (spam|positive|negative))",
    _FLAGS,
)
_TASK = re.compile(
    r"^\s*(explain|write|describe|create|draft|compare|outline|suggest|summari[sz]e|plan|help me|implement|"
    r"build|develop|rewrite \w+ \w+ to|give me (feedback|\w+ ideas|a \w+ plan|a plan|examples)|"
    r"how (does|do|can|should)|"
    r"what (are|should|does this)|what is the difference|what is [^?]{3,40} and (how|why|when)|why (does|do|is))\b",
    _FLAGS,
)
_BULK_ASK = re.compile(
    r"\b(translate|summari[sz]e|tl;?dr|extract|proofread|fix (the )?(grammar|spelling|typos)|"
    r"rewrite|paraphrase|list the (names|dates|emails)|classify)\b",
    _FLAGS,
)

SIGNALS = (
    "length",
    "bulk_text",
    "code_block",
    "code_lines",
    "debugging",
    "strong_reasoning",
    "reasoning",
    "many_requirements",
    "multi_step",
    "sequence_words",
    "math",
    "long_output",
    "conversation",
    "tools",
    "simple_ask",
    "task",
    "brief",
    "reasoning_effort",
)


def parse_header(value: str | None) -> Tier | None:
    """The tier a client asked for with ``X-Spendstream-Complexity``, None if absent."""
    if value is None or not value.strip():
        return None
    try:
        return Tier(value.strip().lower())
    except ValueError:
        raise ComplexityHeaderError(
            f"{HEADER} must be one of simple, medium, complex (got {value.strip()[:40]!r})"
        ) from None


def _texts(content: Any) -> Iterator[str]:
    """Text parts of an OpenAI or Anthropic message content (string, or a list of typed parts)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    yield text
                elif part.get("type") == "tool_result":
                    yield from _texts(part.get("content"))


def _keyword_counts(text: str) -> dict[str, int]:
    """Occurrences of each keyword group's words and phrases in ``text`` (case-insensitive)."""
    lower = text.lower()
    counts = dict.fromkeys(_KEYWORDS, 0)
    group_of = _GROUP_OF_WORD
    for word in [word for word in lower.translate(_PUNCT_TO_SPACE).split() if word in group_of]:
        counts[group_of[word]] += 1
    if len(lower) > _PHRASE_GATE_CHARS or _ANY_PHRASE.search(lower):
        for group, phrases in _PHRASES.items():
            counts[group] += sum(lower.count(phrase) for phrase in phrases)
    return counts


def _code_lines(text: str) -> int:
    lines = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(_CODE_STARTS) or stripped.endswith((";", "{")) or "=>" in stripped:
            lines += 1
    return lines + sum(text.count(marker) for marker in _CODE_MARKERS)


def _requested_output(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


_LENGTH_STEPS = (10, 20, 40, 80, 200)  # words: each step passed is one point


def _length_points(words: int) -> int:
    return sum(1 for step in _LENGTH_STEPS if words >= step)


def assess(body: Mapping[str, Any], header: str | None = None) -> Assessment:
    """Classify one request body; ``header`` is the raw ``X-Spendstream-Complexity`` value (may raise
    ``ComplexityHeaderError``)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        given = body.get("input")  # the Responses API: a string, or messages
        messages = given if isinstance(given, list) else [{"role": "user", "content": given}] if given else []
    total_chars = 0
    last_user = ""
    system_parts: list[str] = []
    system = body.get("system") or body.get("instructions")  # Anthropic; the Responses API
    for text in _texts(system):
        total_chars += len(text)
        system_parts.append(text)
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, str):  # the usual shape, without the generator
            parts: list[str] = [content]
            size = len(content)
        else:
            parts = list(_texts(content))
            size = sum(len(p) for p in parts)
        total_chars += size
        if role in ("system", "developer"):
            system_parts.extend(parts)
        elif role == "user" and size:
            last_user = "\n".join(parts)
    prompt = body.get("prompt")  # legacy completions
    for text in _texts(prompt if isinstance(prompt, list) else [prompt] if isinstance(prompt, str) else None):
        total_chars += len(text)
        last_user = text
    output_tokens = _requested_output(body)
    input_tokens = total_chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * max(1, len(messages))

    forced = parse_header(header)
    if forced is not None:
        return Assessment(forced, 0, "header", (), input_tokens, output_tokens)

    ask = last_user[:SCAN_CHARS]
    head = ask[:300]
    system_text = "\n".join(system_parts)[:SCAN_CHARS]
    found = _keyword_counts(ask)
    in_head = found if head == ask else _keyword_counts(head)
    in_system = _keyword_counts(system_text) if system_text else dict.fromkeys(_KEYWORDS, 0)
    signals: list[str] = []
    score = 0

    # Length of what is asked now (the system prompt and earlier turns count as "context" below).
    words = (len(last_user) + len(system_text)) // 6  # ~6 characters per English word including the space
    length = _length_points(words)
    if length >= 2 and _BULK_ASK.search(head) and not in_head["reasoning"]:
        length = 1  # a pasted document to translate or summarise is long, not hard
        signals.append("bulk_text")
    if length:
        score += length
        signals.append("length")
    fences = ask.count("```")
    if fences >= 2:
        score += 2
        signals.append("code_block")
    elif _code_lines(ask) >= 3:
        score += 1
        signals.append("code_lines")
    if found["debug"] + in_system["debug"]:
        score += 1
        signals.append("debugging")
    strong = found["strong"] + in_system["strong"]
    if strong:
        score += min(4, 2 * strong)
        signals.append("strong_reasoning")
    reasoning = found["reasoning"] + in_system["reasoning"]
    if reasoning:
        score += min(2, reasoning)
        signals.append("reasoning")
    clauses = ask.count(",") + ask.count(";")
    if clauses >= 4:
        score += 2 if clauses >= 8 else 1
        signals.append("many_requirements")
    items = len(_LIST_ITEM.findall(ask))
    if items >= 3:
        score += 2 if items >= 5 else 1
        signals.append("multi_step")
    if _TASK.search(head):
        score += 2
        signals.append("task")
    if in_head["brief"] or _UNDER_WORDS.search(head.lower()):
        score -= 1
        signals.append("brief")
    if found["sequence"] >= 2:
        score += 1
        signals.append("sequence_words")
    if found["math"] or _MATH_SYMBOLS.search(ask) or _DOLLAR_MATH.search(ask) or _EQUATION.search(ask):
        score += 3 if strong else 2  # proofs and derivations: mathematics that must be argued, not looked up
        signals.append("math")
    long_output = 0
    if output_tokens is not None:
        long_output = 2 if output_tokens >= 2000 else 1 if output_tokens >= 800 else 0
    if found["long"] or _WORD_COUNT.search(ask):
        long_output = max(long_output, 1)
    if long_output:
        score += long_output
        signals.append("long_output")
    if len(messages) >= 6 or total_chars - len(last_user) - len(system_text) > 3000:
        score += 1
        signals.append("conversation")
    if body.get("tools") or body.get("functions"):
        score += 1
        signals.append("tools")
    if body.get("reasoning_effort") == "high":
        score += 2
        signals.append("reasoning_effort")
    if _SIMPLE_ASK.search(head) and not fences:
        score -= 2
        signals.append("simple_ask")

    tier = Tier.simple if score <= SIMPLE_MAX else Tier.medium if score <= MEDIUM_MAX else Tier.complex
    return Assessment(tier, score, "classifier", tuple(signals), input_tokens, output_tokens)
