"""Progress bars go to a terminal, not into logs or pipes, unless $TUNEWRIGHT_PROGRESS says otherwise."""

from __future__ import annotations

import io

from infer.progress import progress_bar, progress_wanted


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("TUNEWRIGHT_PROGRESS", raising=False)
    assert progress_wanted(Terminal()) is True
    assert progress_wanted(io.StringIO()) is False
    monkeypatch.setenv("TUNEWRIGHT_PROGRESS", "0")
    assert progress_wanted(Terminal()) is False
    monkeypatch.setenv("TUNEWRIGHT_PROGRESS", "1")
    assert progress_wanted(io.StringIO()) is True


def test_a_bar_draws_on_a_terminal_stderr(monkeypatch):
    monkeypatch.delenv("TUNEWRIGHT_PROGRESS", raising=False)
    for stream, shown in [(Terminal(), True), (io.StringIO(), False)]:
        monkeypatch.setattr("sys.stderr", stream)
        with progress_bar(3, "scoring", "row") as bar:
            for _ in range(3):
                bar.update()
        assert ("scoring" in stream.getvalue() and "3/3" in stream.getvalue()) is shown
