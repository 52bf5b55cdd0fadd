"""Tokenization: a thin wrapper over a Hugging Face tokenizer (encode / decode / chat template / eos ids of a
checkpoint folder; offline, no remote code). Streaming detokenization and stop strings: `detokenizer.py`."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.errors import InvalidRequest, ModelLoadError

logger = logging.getLogger(__name__)

# Files a tokenizer can be loaded from (any one of the groups), besides tokenizer_config.json.
_TOKENIZER_FILE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
)
_EXPECTED_FILES_MSG = (
    "expected tokenizer.json (preferred), or tokenizer.model (sentencepiece), or vocab.json + merges.txt, "
    "next to tokenizer_config.json"
)

REPLACEMENT_CHAR = "\ufffd"

# transformers' clean_up_tokenization(), applied in this order.
_CLEANUP_PAIRS: tuple[tuple[str, str], ...] = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True


def _clean_up(text: str) -> str:
    for old, new in _CLEANUP_PAIRS:
        text = text.replace(old, new)
    return text


class Tokenizer:
    """A checkpoint's tokenizer, loaded with transformers.AutoTokenizer (local files only, no remote code)."""

    def __init__(self, hf_tokenizer: Any, folder: Path | None = None):
        self._hf = hf_tokenizer
        self.folder = folder
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._eos_ids = self._collect_eos_ids()
        self._cleanup = self._decode_applies_cleanup()
        self._init_decoder_facts()

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder {str(folder)!r} does not exist or is not a directory")
        if not any(all((folder / name).is_file() for name in group) for group in _TOKENIZER_FILE_GROUPS):
            present = sorted(p.name for p in folder.iterdir())
            raise ModelLoadError(
                f"no tokenizer files in {str(folder)!r}: {_EXPECTED_FILES_MSG}; found {present[:20]}"
            )
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError / ValueError / ImportError / json errors
            hint = ""
            if not (folder / "tokenizer.json").is_file():
                hint = (
                    " (there is no tokenizer.json: transformers must convert tokenizer.model or vocab.json/"
                    "merges.txt, which needs the sentencepiece/protobuf packages; adding a tokenizer.json avoids it)"
                )
            raise ModelLoadError(
                f"could not load the tokenizer in {str(folder)!r}: {type(e).__name__}: {e}{hint}"
            ) from e
        if hf is None or not hasattr(hf, "decode"):
            raise ModelLoadError(f"could not load the tokenizer in {str(folder)!r}: {_EXPECTED_FILES_MSG}")
        return cls(hf, folder)

    def _collect_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = getattr(self._hf, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        if self.folder is not None:
            path = self.folder / "generation_config.json"
            if path.is_file():
                try:
                    gen = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise ModelLoadError(f"unreadable {path}: {e}") from e
                value = gen.get("eos_token_id") if isinstance(gen, dict) else None
                if isinstance(value, int) and not isinstance(value, bool):
                    ids.add(value)
                elif isinstance(value, list):
                    ids.update(v for v in value if isinstance(v, int) and not isinstance(v, bool))
        return frozenset(ids)

    def _init_decoder_facts(self) -> None:
        """What the streaming detokenizer must know about the backend's decoder:

        - byte-fallback tokens (<0x41>): tokenizers' ByteFallback decoder turns a whole run of consecutive byte
          tokens into text only if the entire run is valid UTF-8, else into one U+FFFD per byte, so a later
          byte can change the text of earlier ones ("<0x41>" alone is "A", "<0x41><0xC3><0x42>" is three U+FFFD);
        - special ids (dropped by skip_special_tokens before the decoder runs, so they do not end a byte run)
          and the backend's vocabulary size (unknown ids are dropped silently).
        """
        self._byte_ids: frozenset[int] = frozenset()
        self._special_ids: frozenset[int] = frozenset()
        self._backend_vocab = len(self._hf)
        if self._backend is None:
            return
        try:
            self._backend_vocab = self._backend.get_vocab_size(with_added_tokens=True)
            self._special_ids = frozenset(
                i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special
            )
            decoder = json.loads(self._backend.to_str()).get("decoder")
        except Exception:  # pragma: no cover - exotic backends
            return
        if "ByteFallback" in json.dumps(decoder):
            self._byte_ids = frozenset(
                i
                for tok, i in self._backend.get_vocab(with_added_tokens=False).items()
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">") and _is_hex(tok[3:5])
            )

    def _decode_applies_cleanup(self) -> bool:
        """Whether transformers' decode() post-processes with clean_up_tokenization (it skips it for BPE models)."""
        if not getattr(self._hf, "clean_up_tokenization_spaces", False):
            return False
        if self._backend is not None and type(self._backend.model).__name__ == "BPE":
            return bool(
                getattr(self._hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
            )
        return True

    # --------------------------------------------------------------------------------------------- basics
    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer."""
        return self._hf

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"text to encode must be a string, got {type(text).__name__}")
        # verbose=False: no "sequence longer than model_max_length" warning; the engine checks context length.
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens, verbose=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        """decode() without transformers' clean-up pass (the detokenizer applies it in a streaming way)."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    def token_to_id(self, token: str) -> int | None:
        tid = self._hf.convert_tokens_to_ids(token)
        unk = getattr(self._hf, "unk_token_id", None)
        if tid is None or (tid == unk and token != getattr(self._hf, "unk_token", None)):
            return None
        return int(tid)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        bos = getattr(self._hf, "bos_token_id", None)
        return bos if isinstance(bos, int) else None

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    # ------------------------------------------------------------------------------------- chat template
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Renders messages with the checkpoint's chat template and tokenizes the result (the template is
        expected to emit its own special tokens such as <s>, so no extra BOS is added)."""
        if not self.has_chat_template:
            where = f" in {str(self.folder)!r}" if self.folder is not None else ""
            raise InvalidRequest(
                f"this model has no chat template (no 'chat_template' in tokenizer_config.json or "
                f"chat_template.jinja{where}); use a completion request with a plain prompt instead"
            )
        normalized = _validate_messages(messages)
        try:
            rendered = self._hf.apply_chat_template(
                normalized, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as e:  # jinja2 TemplateError (raise_exception in the template), TypeError, ...
            raise InvalidRequest(f"the chat template rejected the messages: {e}") from e
        if not isinstance(rendered, str):
            raise InvalidRequest("the chat template did not render to a string")
        return self.encode(rendered, add_special_tokens=False)


def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise InvalidRequest(f"messages must be a list of objects, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequest("messages must not be empty")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"messages[{i}].role must be a non-empty string, got {role!r}")
        if "content" not in m:
            raise InvalidRequest(f"messages[{i}] has no 'content'")
        content = m["content"]
        if content is None:
            if role != "assistant":
                raise InvalidRequest(f"messages[{i}].content is null (only allowed for assistant messages)")
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(
                        f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}"
                    )
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}"
            )
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out
