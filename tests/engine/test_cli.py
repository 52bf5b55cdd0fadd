"""`ferry generate` and `ferry chat` as a user runs them (subprocess, real checkpoint)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ferry import LLM, SamplingParams
from tests.checkpoints import make_checkpoint


def ferry(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ferry", *args], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return str(make_checkpoint("llama", tmp_ckpt_dir))


def test_generate_prints_the_greedy_text(llama):
    want = LLM(llama).generate("Lily walked", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    r = ferry("generate", llama, "--prompt", "Lily walked", "--max-tokens", "12", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.outputs[0].text + "\n"


def test_chat_answers_each_line_with_the_template(llama):
    llm = LLM(llama)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    want = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    r = ferry("chat", llama, "--max-tokens", "6", "--threads", "1", stdin="Hello\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("> " + want.outputs[0].text + "\n")


def test_errors_are_one_clear_line(tmp_path):
    r = ferry("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: model folder") and "Traceback" not in r.stderr
    r = ferry("generate", str(tmp_path), "--prompt", "x", "--kv-cache-memory", "lots")
    assert r.returncode == 2 and "cannot read 'lots' as a size" in r.stderr
