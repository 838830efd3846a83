"""ANSI colour rendering of log lines for the dashboard: escaping first, colours as classes, every other
escape sequence dropped."""

from __future__ import annotations

from kici.orchestrator.web.ansi import ansi_to_html, strip_ansi


def test_plain_text_is_escaped() -> None:
    assert ansi_to_html('<script>alert("x")</script> & more') == '&lt;script&gt;alert("x")&lt;/script&gt; &amp; more'


def test_colours_become_classes_and_reset_closes_them() -> None:
    assert ansi_to_html("\x1b[31mred\x1b[0m plain") == '<span class="a-fg1">red</span> plain'
    assert ansi_to_html("\x1b[1;92;44mx") == '<span class="a-fg10 a-bg4 a-b">x</span>'
    assert ansi_to_html("\x1b[33mA\x1b[39mB") == '<span class="a-fg3">A</span>B'
    assert ansi_to_html("\x1b[38;5;9mbright\x1b[38;5;200mgone") == (
        '<span class="a-fg9">bright</span>gone'
    )
    assert ansi_to_html("\x1b[38;2;1;2;3mtrue\x1b[4mu") == 'true<span class="a-u">u</span>'


def test_other_sequences_and_control_characters_are_dropped() -> None:
    assert ansi_to_html("a\x1b[2Kb\x1b]0;title\x07c\x08d") == "abcd"
    assert ansi_to_html("\x1b[31m<b>\x1b[0m") == '<span class="a-fg1">&lt;b&gt;</span>'


def test_strip_ansi() -> None:
    assert strip_ansi("\x1b[1mbold\x1b[0m \x1b]0;t\x07text") == "bold text"
