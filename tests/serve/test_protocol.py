"""A request's text as its tokens arrive (`TextStream`): what is sent adds up to the final text, stop strings
cut it (even across tokens, never sent in part), incomplete characters wait, and the finish reason is right."""

from __future__ import annotations

from freevlm.serve.protocol import TextStream

EOS = 0


class PieceTokenizer:
    """Token i decodes to PIECES[i]; the EOS token to nothing (a special token)."""

    PIECES = ["", " a", " ca", "t on", " the", " mat", "\xe9", " caf"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.PIECES[i] for i in ids)
        # a multi-byte character split over tokens decodes to U+FFFD until its last byte comes (token 7 then 6)
        return text.replace(" caf", " caf\ufffd") if ids and ids[-1] == 7 else text


def _run(tokens, stop=(), max_tokens=20, incremental=True):
    stream = TextStream(PieceTokenizer(), [EOS], max_tokens, list(stop), incremental)
    sent = []
    for token in tokens:
        sent.append(stream.push(token))
        if stream.finished:
            break
    return sent, stream


def test_deltas_add_up_to_the_text_and_eos_stops():
    sent, stream = _run([1, 2, 3, 4, 5, EOS, 1])
    assert sent == ["a", " ca", "t on", " the", " mat", ""]
    assert stream.sent == "a cat on the mat" and stream.finish_reason == "stop" and len(stream.tokens) == 6


def test_a_text_not_streamed_comes_whole_at_the_end():
    sent, stream = _run([1, 2, 3, 4, 5, EOS], incremental=False)
    assert sent == ["", "", "", "", "", "a cat on the mat"] and stream.finish_reason == "stop"
    sent, stream = _run([1, 2, 3, 4, 5], stop=[" the"], incremental=False)  # stop strings are watched all along
    assert "".join(sent) == "a cat on" and stream.finish_reason == "stop" and len(stream.tokens) == 4


def test_max_tokens_ends_with_length():
    sent, stream = _run([1, 2, 3], max_tokens=3)
    assert "".join(sent) == "a cat on" and stream.finish_reason == "length"


def test_a_stop_string_across_tokens_is_never_sent_in_part():
    sent, stream = _run([1, 2, 3, 4, 5], stop=["t on the"])
    assert "".join(sent) == "a ca" and stream.finish_reason == "stop"
    assert all("t" not in piece for piece in sent), "no prefix of the stop string went out"
    sent, stream = _run([1, 2, 3, 4, 5], stop=["dog"])
    assert "".join(sent) == "a cat on the m" and stream.finish_reason is None, "the last 2 characters wait"
    sent, stream = _run([1, 2, 3, 4, 5, EOS], stop=["dog"])
    assert "".join(sent) == "a cat on the mat", "sent in full once finished"


def test_an_incomplete_character_waits_for_its_last_byte():
    sent, stream = _run([1, 7, 6, EOS])
    assert sent == ["a", " caf", "\xe9", ""] and stream.sent == "a caf\xe9", "U+FFFD is never sent"
