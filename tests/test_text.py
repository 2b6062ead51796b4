"""Streaming text: never half a UTF-8 character, never a piece of a stop string."""

from hypothesis import given
from hypothesis import strategies as st

from chatforge.generate.text import IncrementalText, held_back_length


def stream(pieces, stops=(), min_checked=0):
    text = IncrementalText(stops)
    out = [text.push(p, check_stops=i >= min_checked) for i, p in enumerate(pieces)]
    out.append(text.finish())
    return out, text


def test_an_emoji_split_across_tokens_is_released_only_when_complete():
    data = "ok 🙂!".encode()
    pieces = [data[:4], data[4:5], data[5:6], data[6:]]  # the emoji's 4 bytes (3..6) arrive in four pieces
    out, _ = stream(pieces)
    assert out[:3] == ["ok ", "", ""]
    assert "".join(out) == "ok 🙂!"
    assert all("\ufffd" not in o for o in out)


def test_a_stop_string_split_across_tokens_is_never_emitted():
    out, text = stream([b"Hello", b"\nUs", b"er:", b" more"], stops=["\nUser:"])
    assert "".join(out) == "Hello"
    assert out[1] == ""  # "\nUs" is held back: it may become the stop string
    assert text.stopped and text.text == "Hello"


def test_held_back_text_is_released_when_it_cannot_become_a_stop_string():
    out, text = stream([b"a\nU", b"nder"], stops=["\nUser:"])
    assert out == ["a", "\nUnder", ""]
    assert not text.stopped


def test_the_earliest_of_several_stop_strings_wins():
    out, text = stream([b"one two three"], stops=["three", "two"])
    assert text.text == "one " and "".join(out) == "one "


def test_stop_strings_are_ignored_until_checking_starts_and_sent_text_is_never_taken_back():
    out, text = stream([b"END", b" x END"], stops=["END"], min_checked=1)
    assert "".join(out) == "END x " and text.stopped


def test_held_back_length_is_the_longest_suffix_that_starts_a_stop():
    assert held_back_length("abc\nUs", ["\nUser:", "sx"]) == 3
    assert held_back_length("abc", ["zzz"]) == 0
    assert held_back_length("xa", ["ab"]) == 1
    assert held_back_length("ab", ["ab"]) == 0  # a full match is a stop, not a hold


@given(st.text(), st.lists(st.integers(1, 6), max_size=30))
def test_any_text_cut_anywhere_streams_back_exactly(s, cuts):
    data, pieces, i = s.encode(), [], 0
    for c in cuts:
        pieces.append(data[i : i + c])
        i += c
    pieces.append(data[i:])
    out, _ = stream(pieces)
    assert "".join(out) == s


@given(st.text(alphabet="ab\n", max_size=30), st.text(alphabet="ab\n", min_size=1, max_size=4))
def test_streamed_output_is_the_text_cut_at_the_first_stop(s, stop):
    out, _ = stream([c.encode() for c in s], stops=[stop])
    cut = s.find(stop)
    assert "".join(out) == (s if cut < 0 else s[:cut])


def test_a_chat_reply_drops_the_whitespace_before_its_first_character_only():
    """A first token may carry a space (" Kesh"); the template renders a reply from its first character."""
    text = IncrementalText(strip_leading_whitespace=True)
    out = [text.push(p) for p in (b" ", b"\n ", b" Kesh", b" is", b"  far.")] + [text.finish()]
    assert out == ["", "", "Kesh", " is", "  far.", ""] and text.text == "Kesh is  far."
    assert stream([b" Kesh"])[1].text == " Kesh"  # completions keep every character


@given(st.text(max_size=20), st.lists(st.text(" \n\t", max_size=3), max_size=3))
def test_stripping_leading_whitespace_equals_lstrip_of_the_whole_text(s, spaces):
    pieces = [p.encode() for p in spaces] + [s.encode()[i:i + 3] for i in range(0, len(s.encode()), 3)]
    text = IncrementalText(strip_leading_whitespace=True)
    out = "".join(text.push(p) for p in pieces) + text.finish()
    assert out == ("".join(spaces) + s).lstrip()
