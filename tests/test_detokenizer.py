"""IncrementalDetokenizer against `tokenizer.decode` of the whole sequence (the oracle).

Token streams are drawn by hypothesis from an alphabet built on the default model's tokenizer:
tokens of multi-byte characters (accents, CJK, emoji, Cyrillic; several of them are single bytes
of a UTF-8 character), plain ASCII tokens, lone high bytes and the special tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixkv.engine.detokenizer import IncrementalDetokenizer
from radixkv.model import load_tokenizer

TEXTS = ("héllo 日本語 🤖 Привет", "naïve café — “quotes” ½ ∑ 🤖🤖!", "a b\n\tc  d", "x.y,z!? 12")
FFFD = "\ufffd"

_TOK: Any = None


def tokenizer() -> Any:
    global _TOK
    if _TOK is None:
        _TOK = load_tokenizer(None)  # the default model's tokenizer only (no weights)
    return _TOK


def alphabet() -> list[int]:
    tok = tokenizer()
    ids = {i for t in TEXTS for i in tok.encode(t, add_special_tokens=False)}
    ids |= set(tok.all_special_ids)
    ids |= set(range(100, 120)) | set(range(230, 260))  # ASCII-ish tokens and lone high bytes
    return sorted(ids)


@pytest.fixture(scope="module")
def tok() -> Any:
    return tokenizer()


def stream(draw_ids: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(draw_ids, min_size=1, max_size=40)


IDS = st.deferred(lambda: st.sampled_from(alphabet()))
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(ids=stream(IDS), skip=st.booleans())
def test_text_equals_full_decode_at_every_step(tok, ids, skip):
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = []
    for k, t in enumerate(ids):
        pieces.append(d.add(t))
        full = tok.decode(ids[:k + 1], skip_special_tokens=skip)
        # what is held back is only a trailing incomplete character (decoded as U+FFFD): a
        # U+FFFD already made final by later bytes is not held
        assert full.startswith(d.text), (ids[:k + 1], full, d.text)
        held = full[len(d.text):]
        assert not held or (held.endswith(FFFD) and FFFD not in held[:-1]), (ids[:k + 1], held)
        assert "".join(pieces) == d.text
    d.finish()
    assert d.text == tok.decode(ids, skip_special_tokens=skip)
    assert d.stop_hit is None


def test_multibyte_character_is_never_split(tok):
    ids = tok.encode("🤖 日本", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(t) for t in ids]
    assert "".join(pieces) == "🤖 日本"
    assert all(FFFD not in p for p in pieces)
    assert "" in pieces  # the emoji takes several byte tokens: nothing until it is complete


def test_lone_bytes_are_not_held_until_the_end(tok):
    # a confused model repeating a 4-byte lead byte (0xF0): invalid UTF-8 that never completes
    lead = tok.convert_tokens_to_ids("ð")
    assert tok.decode([lead]) == FFFD
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(lead) for _ in range(50)]
    assert d.text == FFFD * 49  # every U+FFFD but the last is final at once
    d.finish()
    assert d.text == tok.decode([lead] * 50) and pieces[0] == "" and pieces[1] == FFFD


def test_special_tokens_skipped_or_kept(tok):
    ids = [*tok.encode("Hi", add_special_tokens=False), tok.eos_token_id,
           *tok.encode(" there", add_special_tokens=False)]
    for skip in (True, False):
        d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        for t in ids:
            d.add(t)
        d.finish()
        assert d.text == tok.decode(ids, skip_special_tokens=skip)
    assert tok.eos_token not in tok.decode(ids, skip_special_tokens=True)


def run(tok: Any, ids: list[int], stops: list[str], include: bool = False
        ) -> tuple[IncrementalDetokenizer, list[str], int]:
    """Feed `ids` until a stop hits; returns the detokenizer, every safe_text, tokens fed."""
    d = IncrementalDetokenizer(tok, stops, include_stop_str_in_output=include)
    safe = []
    fed = 0
    for t in ids:
        d.add(t)
        fed += 1
        safe.append(d.safe_text())
        if d.stop_hit is not None:
            break
    d.finish()
    return d, safe, fed


def test_stop_string_spanning_token_boundaries(tok):
    text = "Hello world, stop here please"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    stop = "o w"  # the end of "Hello" and the start of " world": two tokens
    assert not any(stop in p for p in pieces)
    for include, want in ((False, "Hell"), (True, "Hello w")):
        d, _, fed = run(tok, ids, [stop], include)
        assert d.stop_hit == stop and d.text == want
        assert fed == 2  # found as soon as the token completing it arrived
    d, _, _ = run(tok, ids, ["zzz", "here p", "stop"])  # the earliest occurrence wins
    assert d.stop_hit == "stop" and d.text == "Hello world, "


@SETTINGS
@given(ids=stream(IDS), data=st.data(), include=st.booleans())
def test_stop_strings_against_full_decode(tok, ids, data, include):
    full = tok.decode(ids, skip_special_tokens=True)
    stops = []
    if full:  # a stop taken from the text (so it hits), often spanning tokens
        i = data.draw(st.integers(0, len(full) - 1))
        j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
        if FFFD not in full[i:j]:
            stops.append(full[i:j])
    # and stops that do not occur (one hit at most: which of two hits first depends on how
    # the text grows, see the hand-made case above)
    extra = data.draw(st.lists(st.text("abxyz日🤖 ", min_size=1, max_size=4), max_size=2))
    stops += [s for s in extra if s not in full]
    d, safe, _ = run(tok, ids, stops, include)
    if stops and stops[0] in full:
        i, s = full.find(stops[0]), stops[0]
        assert d.stop_hit == s
        assert d.text == (full[:i + len(s)] if include else full[:i])
    else:
        assert d.stop_hit is None and d.text == full
    # streamed text only grows, never shows a piece of a stop string, and the final text
    # extends all of it
    for a, b in zip(safe, safe[1:], strict=False):
        assert b.startswith(a), (a, b)
    for s in safe:
        assert d.text.startswith(s)
        if d.stop_hit is not None and not include:
            assert d.stop_hit not in s
