"""visible_logprobs: the logprob tokens of a choice ended by a stop string join to its text (issue 23), except a
token the stop string cuts in the middle, which is kept."""
from __future__ import annotations

from ferry.request import CompletionOutput, TokenLogprob
from ferry.server.streaming import TokenTexts, visible_logprobs

VOCAB = {1: " the", 2: " dog", 3: ".", 4: ".\n", 5: " dog."}
texts = TokenTexts(lambda ids: "".join(VOCAB[i] for i in ids))


def _out(ids: list[int], text: str, finish: str = "stop", stop: str | int | None = ".") -> CompletionOutput:
    return CompletionOutput(0, text, ids, finish, [TokenLogprob(i, -0.5, []) for i in ids], stop)


def _joined(c: CompletionOutput) -> str:
    return "".join(texts(lp.token_id) for lp in c.logprobs)


def test_stop_string_token_dropped():
    c = visible_logprobs(_out([1, 2, 3], " the dog"), texts)
    assert _joined(c) == c.text == " the dog" and c.token_ids == [1, 2, 3]  # token ids (usage) unchanged


def test_token_past_the_text_dropped_token_cut_by_the_stop_kept():
    c = visible_logprobs(_out([1, 2, 4], " the dog"), texts)  # ".\n": starts with the stop, wholly hidden
    assert _joined(c) == c.text
    c = visible_logprobs(_out([1, 5], " the dog"), texts)  # " dog.": the stop cuts it, " dog" is shown
    assert len(c.logprobs) == 2 and _joined(c).startswith(c.text)


def test_other_finishes_untouched():
    for c in (_out([1, 2, 3], " the dog.", "length", None), _out([1, 2, 3], " the dog.", "stop", 2),
              _out([1, 3], " the.", "stop", ".")):  # include_stop_str_in_output: the text shows the stop
        assert visible_logprobs(c, texts) is c
