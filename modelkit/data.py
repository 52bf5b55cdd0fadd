"""The training corpus and tokenizer, built offline from Debian packages.

Sources (fetched with ``apt-get download`` from Debian's archive, unpacked with
``dpkg-deb``; nothing is installed):

- ``python3.11-doc`` — the Python 3.11 documentation, reStructuredText sources
  (``html/_sources/**/*.rst.txt``). Licence: PSF License Version 2 (see the
  package's copyright file).
- ``debian-reference-en`` — the Debian Reference, plain-text edition.
  Licence: GPL-2+ (see the package's copyright file).

Documents are split into train and held-out by a hash of their path, so the
split is stable. ``python -m modelkit.data`` builds everything into
``modelkit/.cache/`` and prints sizes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGES = ("python3.11-doc", "debian-reference-en")
VOCAB_SIZE = 4096
SPECIAL = ["<unk>", "<s>", "</s>"]
DOC_SEP = "\n\n\n"  # clean_rst never leaves three newlines in a row
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' if loop.first else '' }}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _fetch(pkg: str) -> Path:
    out = CACHE / "debs" / pkg
    if out.exists():
        return out
    (CACHE / "debs").mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", pkg], cwd=CACHE / "debs", check=True, capture_output=True)
    deb = next((CACHE / "debs").glob(f"{pkg}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    return out


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`[!~]?([^`<]*?)(?:\s*<[^>]*>)?`")


def clean_rst(text: str) -> str:
    """reST source to plain prose: roles unwrapped, directives and rules dropped."""
    out = []
    skip_indent = None
    for line in text.splitlines():
        if skip_indent is not None:
            if line.strip() and (len(line) - len(line.lstrip())) <= skip_indent:
                skip_indent = None
            else:
                continue
        if line.startswith(".. "):
            skip_indent = 0
            continue
        if re.fullmatch(r"\s*([=*\-^~#\"'`]){3,}\s*", line):
            continue
        line = _ROLE.sub(r"\1", line).replace("``", "")
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def documents() -> list[tuple[str, str]]:
    """(name, text) for every document of the corpus."""
    docs = []
    py = _fetch("python3.11-doc")
    for f in sorted(py.rglob("*.rst.txt")):
        docs.append((str(f.relative_to(py)), clean_rst(f.read_text(errors="replace"))))
    ref = _fetch("debian-reference-en")
    txt = gzip.decompress(next(ref.rglob("debian-reference.en.txt.gz")).read_bytes()).decode()
    for i, chapter in enumerate(re.split(r"\n(?=Chapter \d+\.)", txt)):
        docs.append((f"debian-reference/{i}", chapter.strip()))
    return [(n, t) for n, t in docs if len(t) > 200]


def is_heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20 == 0


def build_corpus() -> tuple[Path, Path]:
    train, held = CACHE / "train.txt", CACHE / "heldout.txt"
    if not train.exists():
        docs = documents()
        train.write_text(DOC_SEP.join(t for n, t in docs if not is_heldout(n)))
        held.write_text(DOC_SEP.join(t for n, t in docs if is_heldout(n)))
    return train, held


def train_tokenizer(files: list[Path], path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Byte-level BPE with digits split one by one (numbers stay copyable), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(f) for f in files], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def build_tokenizer(out_dir: Path | None = None) -> Path:
    """The corpus tokenizer (trained once, cached); also written to out_dir with its config."""
    path = CACHE / "tokenizer.json"
    if not path.exists():
        train_tokenizer([build_corpus()[0]], path)
    if out_dir is not None:
        write_tokenizer(path, out_dir)
    return path


def write_tokenizer(path: Path, out_dir: Path) -> None:
    """tokenizer.json + a tokenizer_config.json with the chat template, as transformers and ferry read them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(path.read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def token_ids(split: str) -> "list[int]":
    """The corpus split ("train" or "heldout") as one token stream, cached."""
    import numpy as np
    from tokenizers import Tokenizer

    cache = CACHE / f"{split}.ids.npy"
    if not cache.exists():
        train, held = build_corpus()
        tok = Tokenizer.from_file(str(build_tokenizer()))
        text = (train if split == "train" else held).read_text()
        eos = tok.token_to_id("</s>")
        ids = [i for enc in tok.encode_batch(text.split(DOC_SEP)) for i in enc.ids + [eos]]
        np.save(cache, np.asarray(ids, dtype=np.int16))
    return np.load(cache).astype(np.int64).tolist()


if __name__ == "__main__":
    train, held = build_corpus()
    build_tokenizer()
    for split in ("train", "heldout"):
        print(split, f"{len(token_ids(split)):,} tokens")
