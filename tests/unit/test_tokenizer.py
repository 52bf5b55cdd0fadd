"""ferry.tokenizer: loading, round trips, streaming detokenization, stop strings, eos ids, chat templates."""
from __future__ import annotations

import json
import pathlib
import random
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from ferry.errors import InvalidRequest, ModelLoadError
from ferry.detokenizer import IncrementalDetokenizer, find_stop
from ferry.tokenizer import Tokenizer, _clean_up
from tests.checkpoints import TOKENIZER_STYLES, make_tokenizer

TEXTS = [
    "Hello world",
    "Once upon a time, Lily walked to the harbor.",
    " leading space and  double  spaces ",
    "line one\nline two\n\n\ttabbed",
    "café naïve résumé — “quotes” ½ €100",
    "emoji 😀🚀 and flags 🇫🇷, family 👨‍👩‍👧",
    "日本語のテキストと中文字符",
    "Ünïcödé ☃ ✓ ∑ ∞",
    "mixed: Hello😀日本 café!",
    "😀",
]


REAL_TOKENIZERS = ["stories260k-hf", "llama2-tokenizer-hf"]


def _tiny(style: str, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp(f"tok-{style}")
    make_tokenizer(folder, style)
    return Tokenizer.load(folder)


def _real(name: str, real_models: pathlib.Path) -> Tokenizer:
    return Tokenizer.load(real_models / name)


@pytest.fixture(scope="module", params=TOKENIZER_STYLES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return _tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=REAL_TOKENIZERS)
def real(request: pytest.FixtureRequest, real_models: pathlib.Path) -> Tokenizer:
    return _real(request.param, real_models)


@pytest.fixture(scope="module", params=[f"tiny-{s}" for s in TOKENIZER_STYLES] + REAL_TOKENIZERS)
def any_tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    if request.param.startswith("tiny-"):
        return _tiny(request.param.removeprefix("tiny-"), tmp_path_factory)
    return _real(request.param, request.getfixturevalue("real_models"))


def stream(tok: Tokenizer, ids: list[int], skip: bool = True, prompt: list[int] | None = None) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(tok, prompt or [], skip_special_tokens=skip)
    pieces = [det.add(i) for i in ids]
    pieces.append(det.flush())
    assert det.text == "".join(pieces)
    return pieces, det.text


# ------------------------------------------------------------------------------------------------ basics


def test_load_and_properties_tiny(tiny: Tokenizer):
    hf = tiny.hf
    assert tiny.vocab_size == len(hf)
    assert tiny.bos_token_id == 1 == hf.bos_token_id
    assert tiny.has_chat_template
    ids = tiny.encode("Hello world")
    assert ids[0] == 1 and ids.count(1) == 1  # add_bos_token
    assert tiny.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tiny.decode(ids) == "Hello world"
    assert tiny.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_round_trip(any_tok: Tokenizer):
    for text in TEXTS:
        ids = any_tok.encode(text, add_special_tokens=False)
        assert any_tok.decode(ids) == text, (text, ids)
        with_bos = any_tok.encode(text)
        assert with_bos[0] == any_tok.bos_token_id
        assert any_tok.decode(with_bos) == text


def test_decode_matches_transformers(any_tok: Tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(any_tok.vocab_size) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            assert any_tok.decode(ids, skip_special_tokens=skip) == any_tok.hf.decode(ids, skip_special_tokens=skip)


def test_real_tokenizers_known_ids(real_models: pathlib.Path):
    folder = real_models / "llama2-tokenizer-hf"
    tok = Tokenizer.load(folder)
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.vocab_size == 32000
    assert tok.eos_token_ids == frozenset({2})
    assert not tok.has_chat_template


# ------------------------------------------------------------------------------------ incremental decoding


def test_incremental_equals_decode_on_text(any_tok: Tokenizer):
    for text in TEXTS:
        ids = any_tok.encode(text)
        for skip in (True, False):
            pieces, out = stream(any_tok, ids, skip)
            assert out == any_tok.decode(ids, skip_special_tokens=skip)
            # valid text never streams a replacement character: partial characters are held back
            assert not any("\ufffd" in p for p in pieces), pieces


def test_multibyte_char_is_held_until_complete(any_tok: Tokenizer):
    ids = any_tok.encode("a😀 ok", add_special_tokens=False)
    emoji_end = len(any_tok.encode("a😀", add_special_tokens=False))
    det = IncrementalDetokenizer(any_tok, [])
    outs = [det.add(i) for i in ids]
    assert "".join(outs) + det.flush() == any_tok.decode(ids)
    assert not any("\ufffd" in o for o in outs)
    # the emoji appears whole, once its last byte arrived (byte-fallback runs: once the run is closed by the
    # next non-byte token, since a later byte could still turn the whole run into U+FFFD)
    first = next(i for i, o in enumerate(outs) if "😀" in o)
    assert first in (emoji_end - 1, emoji_end)
    assert "".join(outs[:first]) in ("", "a")


def test_byte_run_released_by_flush(any_tok: Tokenizer):
    ids = any_tok.encode("a😀", add_special_tokens=False)
    det = IncrementalDetokenizer(any_tok, [])
    streamed = "".join(det.add(i) for i in ids)
    assert streamed + det.flush() == any_tok.decode(ids) == "a😀"
    assert det.text == "a😀"


def test_incremental_equals_decode_random(any_tok: Tokenizer):
    """Random ids, biased to special tokens and byte-fallback tokens (<0x..> at ids 3..258 in llama-like
    vocabularies), so runs of invalid UTF-8 and skipped specials inside byte runs are exercised."""
    rng = random.Random(1234)
    V = any_tok.vocab_size
    for trial in range(300):
        hot = list(range(0, 12)) + list(range(190, 270)) + [rng.randrange(V) for _ in range(6)]
        n = rng.randint(1, 80)
        ids = [rng.choice(hot) if rng.random() < 0.6 else rng.randrange(V) for _ in range(n)]
        skip = trial % 2 == 0
        _, out = stream(any_tok, ids, skip, prompt=[rng.randrange(V) for _ in range(rng.randint(0, 6))])
        assert out == any_tok.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_incremental_out_of_vocab_ids_are_dropped(tiny: Tokenizer):
    ids = tiny.encode("Hello world", add_special_tokens=False)
    ids = ids[:2] + [tiny.vocab_size + 7] + ids[2:]
    _, out = stream(tiny, ids)
    assert out == tiny.decode(ids) == "Hello world"


def test_incremental_is_windowed(any_tok: Tokenizer):
    """add() decodes a short window, not the whole output (O(1) amortized). (Windows only grow over a run of
    byte-fallback tokens or an incomplete character, so this uses mostly-ASCII text.)"""
    ids = any_tok.encode(" ".join(TEXTS[:5]) * 10, add_special_tokens=False)
    lengths: list[int] = []
    real_decode = any_tok._decode_raw

    def spy(window: list[int], skip: bool) -> str:
        lengths.append(len(window))
        return real_decode(window, skip)

    any_tok._decode_raw = spy  # type: ignore[method-assign]
    try:
        det = IncrementalDetokenizer(any_tok, [1])
        for i in ids:
            det.add(i)
        det.flush()
    finally:
        del any_tok._decode_raw
    assert det.text == any_tok.decode(ids)
    assert len(ids) > 200
    assert max(lengths) <= 16, max(lengths)
    assert sum(lengths) < 8 * len(ids)


def test_continuation_keeps_leading_space(real: Tokenizer):
    prompt = real.encode("Once upon a time")
    out = real.encode("Once upon a time there was a cat", add_special_tokens=False)
    # the output ids that continue the prompt (llama: "▁there", "▁was", ...)
    cont = out[len(real.encode("Once upon a time", add_special_tokens=False)) :]
    det = IncrementalDetokenizer(real, prompt, continuation=True)
    text = "".join(det.add(i) for i in cont) + det.flush()
    assert text == " there was a cat"
    # the default mode equals decode(output_ids): the sentencepiece decoder drops the first leading space
    _, plain = stream(real, cont)
    assert plain == real.decode(cont) == "there was a cat"


def test_streaming_clean_up_matches(tiny: Tokenizer):
    """Tokenizers whose decode() applies clean_up_tokenization (non-BPE in transformers 5) stream it exactly."""
    tiny._cleanup = True
    try:
        rng = random.Random(7)
        texts = ["Hello , world . I do n't know ! What 's up ? we 're ' here ' they 've", " , . ! ? ' n't 'm 's"]
        for trial in range(200):
            if trial % 2:
                ids = tiny.encode(rng.choice(texts), add_special_tokens=False)
            else:
                ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 40))]
            _, out = stream(tiny, ids)
            assert out == _clean_up(tiny._decode_raw(ids, True))
    finally:
        tiny._cleanup = False


# ------------------------------------------------------------------------------------------- stop strings


def test_find_stop_basic():
    assert find_stop("hello world", 5, ["world"]) == (6, "world")
    assert find_stop("hello world", 5, ["nope"]) is None
    assert find_stop("hello world", 0, ["world"]) is None
    assert find_stop("hello world", 5, []) is None
    assert find_stop("hello world", 5, [""]) is None


def test_find_stop_only_new_overlap():
    # "hello" lies entirely in the old text: it was checked when it arrived
    assert find_stop("hello world", 3, ["hello"]) is None
    # a stop split across tokens: "wor" arrived before, "ld" now
    assert find_stop("hello world", 2, ["world"]) == (6, "world")
    # the stop ends exactly before the new text: not overlapping
    assert find_stop("hello world!", 1, ["world"]) is None


def test_find_stop_earliest_and_ties():
    assert find_stop("abcdef", 6, ["def", "bc"]) == (1, "bc")
    assert find_stop("abcdef", 6, ["abc", "ab"]) == (0, "abc")  # tie: the first listed
    assert find_stop("xx STOP yy STOP", 8, ["STOP"]) == (11, "STOP")  # the first one overlapping new text


def test_find_stop_streaming_over_tokens(tiny: Tokenizer):
    text = "Once upon a time, Lily walked to the harbor."
    ids = tiny.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tiny, [])
    found = None
    for i in ids:
        piece = det.add(i)
        hit = find_stop(det.text, len(piece), ["Lily walked", "harbor"])
        if hit:
            found = hit
            break
    assert found == (text.index("Lily walked"), "Lily walked")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=30),
    new_len=st.integers(0, 35),
    stops=st.lists(st.text(alphabet="ab c", max_size=4), max_size=4),
)
def test_find_stop_property(text: str, new_len: int, stops: list[str]):
    n = len(text)
    start_new = n - min(new_len, n)
    expected = None
    for stop in stops:
        if not stop or new_len <= 0:
            continue
        for i in range(n - len(stop) + 1):
            if text.startswith(stop, i) and i + len(stop) > start_new:
                if expected is None or i < expected[0]:
                    expected = (i, stop)
                break
    assert find_stop(text, new_len, stops) == expected


# ----------------------------------------------------------------------------------------------- eos ids


def test_eos_ids_from_generation_config(tiny: Tokenizer):
    im_end = tiny.hf.convert_tokens_to_ids("<|im_end|>")
    assert tiny.eos_token_ids == frozenset({2, im_end})


def test_eos_ids_int_and_missing(tmp_path: pathlib.Path):
    make_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.load(tmp_path).eos_token_ids == frozenset({2, 7})
    (tmp_path / "generation_config.json").unlink()
    assert Tokenizer.load(tmp_path).eos_token_ids == frozenset({2})


def test_eos_ids_stories(real_models: pathlib.Path):
    folder = real_models / "stories260k-hf"
    assert Tokenizer.load(folder).eos_token_ids == frozenset({2})


# ----------------------------------------------------------------------------------------- chat template


def test_chat_template(tiny: Tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    ids = tiny.apply_chat_template(messages)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's bos, no second one
    im_start = tiny.hf.convert_tokens_to_ids("<|im_start|>")
    im_end = tiny.hf.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    text = tiny.decode(ids, skip_special_tokens=False)
    assert "Be brief." in text and "Hello world" in text
    assert text.rstrip().endswith("assistant")
    rendered = tiny.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tiny.encode(rendered, add_special_tokens=False)
    no_prompt = tiny.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)
    assert no_prompt[-2] == im_end or no_prompt[-1] == im_end or tiny.decode(no_prompt).endswith("\n")


def test_chat_template_text_parts(tiny: Tokenizer):
    a = tiny.apply_chat_template([{"role": "user", "content": "Hello world"}])
    b = tiny.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    )
    assert a == b


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "must not be empty"),
        ("hi", "must be a list"),
        ([["user", "hi"]], "messages[0] must be an object"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
        ([{"role": "user", "content": None}], "null"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "text part"),
    ],
)
def test_chat_template_malformed(tiny: Tokenizer, messages, fragment: str):
    with pytest.raises(InvalidRequest, match=None) as exc:
        tiny.apply_chat_template(messages)
    assert fragment in str(exc.value)


def test_chat_template_raise_exception(tmp_path: pathlib.Path):
    make_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="Conversation must start with user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_no_chat_template(tmp_path: pathlib.Path):
    make_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequest, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_no_chat_template_stories(real_models: pathlib.Path):
    folder = real_models / "stories260k-hf"
    tok = Tokenizer.load(folder)
    with pytest.raises(InvalidRequest, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------- loading


def test_load_missing_folder(tmp_path: pathlib.Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")


def test_load_folder_without_tokenizer(tmp_path: pathlib.Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as exc:
        Tokenizer.load(tmp_path)
    msg = str(exc.value)
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and "config.json" in msg


def test_load_broken_tokenizer(tmp_path: pathlib.Path):
    make_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        Tokenizer.load(tmp_path)


def test_load_real_copy_works_offline(tmp_path: pathlib.Path, real_models: pathlib.Path):
    src = real_models / "stories260k-hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, tmp_path / name)
    tok = Tokenizer.load(tmp_path)
    assert tok.encode("Once upon a time")[0] == 1
