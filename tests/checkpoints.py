"""Tiny random-weight Hugging Face checkpoints of every supported family, plus a transformers reference.

Each family is built with the transformers config + model class of that family, re-initialized with a
seeded generator (norm weights around 1, biases non-zero, weights with a large-ish std so greedy argmax
has no near-ties), saved with ``save_pretrained(safe_serialization=True)`` next to a small tokenizer
trained on the fly, and can be run greedily by :func:`hf_greedy` as the reference ferry must match.

Nothing here touches the network: tokenizers are trained locally and every load is ``local_files_only``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import pathlib
import random
import shutil
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

PARAGRAPH = (
    "Once upon a time, in a small village by the sea, there lived a girl named Lily. "
    "Every morning she walked to the harbor to watch the fishing boats come home. "
    "The old fisherman, Tom, would wave at her and say: \"The sea is kind today!\" "
    "One day a storm came over the hills. The wind was strong and the rain was cold, "
    "so Lily ran back to her house and sat by the window. She was worried about Tom and his boat. "
    "When the storm was over, she saw the boat coming back, and she was very happy. "
    "Tom gave her a shiny shell as a present. \"Thank you for waiting for me,\" he said. "
    "Lily kept the shell on her table for many years, and she never forgot that day. "
    "The quick brown fox jumps over the lazy dog; 0123456789 and (brackets), [lists] {sets} "
    "<tags> 'quotes' - dashes + plus = equals * star / slash \\ backslash | pipe & and % per $ dollar # hash @ at ! ? ~ ^ _ ` ."
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TOKENIZER_STYLES = ("sentencepiece", "bytelevel")
_TOKENIZER_JSON_CACHE: dict[str, str] = {}


def _train_sentencepiece_style() -> str:
    """A Llama-2-like tokenizer.json: BPE with byte fallback (<0x00>..<0xFF> at ids 3..258), `▁` for spaces,
    Prepend+Replace normalizer, no pre-tokenizer, Replace/ByteFallback/Fuse/Strip decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[], show_progress=False)
    tok.train_from_iterator([PARAGRAPH], trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    pieces = sorted(trained["vocab"].items(), key=lambda kv: kv[1])

    vocab: dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    final = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    final.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    final.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _finish(final, processors)


def _train_bytelevel_style() -> str:
    """A Qwen2-like tokenizer.json: byte-level BPE, NFC normalizer, Split(Qwen regex) + ByteLevel(use_regex=False)
    pre-tokenizer, ByteLevel decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PARAGRAPH], trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    return _finish(tok, processors)


def _finish(tok: Any, processors: Any) -> str:
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + CHAT_TOKENS])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str(pretty=True)


def tokenizer_json(style: str = "sentencepiece") -> str:
    """The tokenizer.json text of the tiny tokenizer (trained once per process, deterministic)."""
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {TOKENIZER_STYLES}")
    if style not in _TOKENIZER_JSON_CACHE:
        fn = _train_sentencepiece_style if style == "sentencepiece" else _train_bytelevel_style
        _TOKENIZER_JSON_CACHE[style] = fn()
    return _TOKENIZER_JSON_CACHE[style]


def tokenizer_vocab_size(style: str = "sentencepiece") -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json(style)).get_vocab_size(with_added_tokens=True)


def make_tokenizer(folder: pathlib.Path, style: str = "sentencepiece") -> None:
    """Writes a small BPE tokenizer (tokenizer.json + tokenizer_config.json + generation_config.json) into folder.

    style="sentencepiece": Llama-2-like (`▁`, byte fallback); style="bytelevel": Qwen2-like (GPT-2 byte level).
    Special tokens <unk>=0, <s>=1, </s>=2, plus added special tokens <|im_start|>, <|im_end|> (the last two ids).
    The tokenizer's eos is </s>; generation_config.json's eos_token_id is [</s>, <|im_end|>].
    An existing generation_config.json is updated (its eos_token_id replaced), not overwritten.
    """
    from tokenizers import Tokenizer

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = tokenizer_json(style)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.from_str(text)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    gen_path = folder / "generation_config.json"
    gen: dict[str, Any] = {}
    if gen_path.exists():
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
    gen["bos_token_id"] = tok.token_to_id("<s>")
    gen["eos_token_id"] = [tok.token_to_id("</s>"), tok.token_to_id("<|im_end|>")]
    gen_path.write_text(json.dumps(gen, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

_MOE: dict[str, Any] = dict(num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32, num_experts_per_tok=2)

# family -> (model_type, tokenizer style, config overrides, legacy rope rewrite or None)
_FAMILIES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any] | None]] = {
    "llama": ("llama", "sentencepiece", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None),
    "llama3": (
        "llama",
        "sentencepiece",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
        None,
    ),
    "llama-linear": (
        "llama",
        "sentencepiece",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        None,
    ),
    # config.json rewritten afterwards in the legacy (transformers 4) style.
    "tinyllama-legacy": (
        "llama",
        "sentencepiece",
        dict(num_hidden_layers=2, rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}),
        {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ),
    "smollm": (
        "llama",
        "bytelevel",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        None,
    ),
    "mistral": (
        "mistral",
        "sentencepiece",
        dict(sliding_window=48, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        None,
    ),
    "qwen2": (
        "qwen2",
        "bytelevel",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        None,
    ),
    "qwen2-yarn": (
        "qwen2",
        "bytelevel",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        ),
        None,
    ),
    "qwen3": (
        "qwen3",
        "bytelevel",
        dict(head_dim=32, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        None,
    ),
    "mixtral": (
        "mixtral",
        "sentencepiece",
        dict(
            num_hidden_layers=2,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        None,
    ),
    "qwen2_moe": (
        "qwen2_moe",
        "bytelevel",
        dict(
            _MOE,
            num_experts=8,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        None,
    ),
    "qwen3_moe": (
        "qwen3_moe",
        "bytelevel",
        dict(
            _MOE,
            num_experts=8,
            head_dim=32,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        None,
    ),
    "olmoe": (  # no moe_intermediate_size: OLMoE experts use intermediate_size
        "olmoe",
        "bytelevel",
        dict(
            num_hidden_layers=2,
            intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            clip_qkv=2.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        None,
    ),
}

FAMILIES: list[str] = list(_FAMILIES)
MOE_FAMILIES: list[str] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]

INITIALIZER_RANGE = 0.15
FINAL_NORM_SCALE = 3.0
ROUTER_STD = 0.5


def family_model_type(family: str) -> str:
    return _FAMILIES[family][0]


def family_tokenizer_style(family: str) -> str:
    return _FAMILIES[family][1]


@contextlib.contextmanager
def _torch_threads(n: int = 1):
    """Run tiny models single-threaded: on a loaded 2-core box, OpenMP spin-waiting makes a 80x64 matmul with
    2 threads ~1000x slower than with 1."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _build_config(family: str, vocab_size: int, dtype: torch.dtype):
    from transformers import AutoConfig

    model_type, _, overrides, _ = _FAMILIES[family]
    kwargs = dict(_COMMON)
    kwargs.update(copy.deepcopy(overrides))
    kwargs["vocab_size"] = vocab_size
    kwargs["initializer_range"] = INITIALIZER_RANGE
    cfg = AutoConfig.for_model(model_type, **kwargs)
    cfg.dtype = dtype
    return cfg


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Deterministic re-initialization independent of transformers' own init: norm weights ~ 1 + N(0, 0.2)
    (the final norm times FINAL_NORM_SCALE), MoE router weights ~ N(0, ROUTER_STD), biases ~ N(0, 0.1), every
    other tensor ~ N(0, INITIALIZER_RANGE)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if id(p) in seen:  # tied lm_head
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name == "model.norm.weight":  # scales the logits: wide top-1/top-2 gaps
            p.copy_(FINAL_NORM_SCALE * (1.0 + 0.2 * noise))
        elif "norm" in name and name.endswith("weight") and p.dim() == 1:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # MoE routers
            p.copy_(ROUTER_STD * noise)  # wide router logits: top-k choice robust to rounding
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(INITIALIZER_RANGE * noise)


def _folder_name(family: str, dtype: torch.dtype, shard: bool, seed: int) -> str:
    name = family
    if dtype != torch.float32:
        name += "-" + str(dtype).removeprefix("torch.")
    if shard:
        name += "-sharded"
    if seed != 0:
        name += f"-seed{seed}"
    return name


_BUILT: set[pathlib.Path] = set()


def make_checkpoint(
    family: str, root: pathlib.Path, *, dtype: torch.dtype = torch.float32, shard: bool = False, seed: int = 0
) -> pathlib.Path:
    """Builds a tiny random-weight model of that family, saves it with its tokenizer and returns the folder.

    The folder is ``root/family`` for the defaults; non-default options get a suffix
    (``root/llama-bfloat16-sharded-seed1``) so variants never overwrite each other.
    The result is deterministic in (family, dtype, shard, seed); a folder built by this process is reused.
    shard=True writes several safetensors shards plus model.safetensors.index.json.
    """
    from transformers import AutoModelForCausalLM

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    folder = pathlib.Path(root) / _folder_name(family, dtype, shard, seed)
    if folder.resolve() in _BUILT and (folder / "config.json").exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    _, style, _, legacy = _FAMILIES[family]
    vocab_size = tokenizer_vocab_size(style)
    cfg = _build_config(family, vocab_size, dtype)
    _quiet_transformers()
    with _torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        _reinit(model, seed)
        model.eval()
        model.to(dtype)
        save_kwargs: dict[str, Any] = {"safe_serialization": True}
        if shard:
            n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            save_kwargs["max_shard_size"] = max(n_bytes // 4, 1024)
        model.save_pretrained(folder, **save_kwargs)
        del model
    make_tokenizer(folder, style)

    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if legacy is not None:
        config.pop("rope_parameters", None)
        config.update(legacy)
        config["torch_dtype"] = config.pop("dtype", str(dtype).removeprefix("torch."))
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    _BUILT.add(folder.resolve())
    return folder


# --------------------------------------------------------------------------------------------------
# Prompts and the transformers reference
# --------------------------------------------------------------------------------------------------


def random_prompts(n: int, lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n prompts of random token ids; prompt i has length lengths[i % len(lengths)].

    Ids are drawn from [3, vocab_size) (no <unk>/<s>/</s>), except that each prompt starts with <s> (id 1)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        if ids:
            ids[0] = 1
        out.append(ids)
    return out


_HF_MODELS: dict[str, Any] = {}


def load_hf_model(folder: str | os.PathLike):
    """transformers AutoModelForCausalLM of a folder in float32 (eager attention), cached per folder + mtime."""
    from transformers import AutoModelForCausalLM

    folder = pathlib.Path(folder).resolve()
    key = f"{folder}:{(folder / 'config.json').stat().st_mtime_ns}"
    if key not in _HF_MODELS:
        _quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
        )
        model.eval()
        _HF_MODELS.clear()
        _HF_MODELS[key] = model
    return _HF_MODELS[key]


@torch.no_grad()
def hf_logits(folder: str | os.PathLike, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence float32 logits [len(token_ids), V] from transformers (no cache, no padding)."""
    model = load_hf_model(folder)
    ids = torch.tensor([token_ids], dtype=torch.long)
    with _torch_threads(1):
        return model(input_ids=ids, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(
    folder: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Reference greedy decoding with transformers in float32, each prompt alone, no padding, ignoring eos.

    Every step re-runs the whole sequence without a KV cache (the simplest, most trustworthy path; the
    models are tiny). Returns (generated ids per prompt, logits [max_new_tokens, V] per prompt)."""
    model = load_hf_model(folder)
    with _torch_threads(1):
        return _greedy_loop(model, prompts, max_new_tokens)


def _greedy_loop(
    model: Any, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    outs: list[list[int]] = []
    all_logits: list[torch.Tensor] = []
    for prompt in prompts:
        seq = list(prompt)
        gen: list[int] = []
        steps = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1].float()
            tok = int(torch.argmax(logits))
            steps.append(logits.clone())
            gen.append(tok)
            seq.append(tok)
        outs.append(gen)
        all_logits.append(torch.stack(steps) if steps else torch.empty(0, model.config.vocab_size))
    return outs, all_logits


# --------------------------------------------------------------------------------------------------
# Self-check: python -m tests.checkpoints
# --------------------------------------------------------------------------------------------------

_DESCRIBE_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "qkv_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "clip_qkv", "dtype", "torch_dtype", "bos_token_id", "eos_token_id",
)


def describe(folder: pathlib.Path) -> dict[str, Any]:
    """The config.json keys ferry's ModelConfig.from_hf cares about (present keys only)."""
    config = json.loads((pathlib.Path(folder) / "config.json").read_text(encoding="utf-8"))
    return {k: config[k] for k in _DESCRIBE_KEYS if k in config}


def _self_check(root: pathlib.Path) -> None:  # pragma: no cover - a developer tool
    import time

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    def weights(folder: pathlib.Path) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as s:
                out.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
        return out

    def logits_with(folder: pathlib.Path, ids: list[int], **changes: Any) -> torch.Tensor:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        for k, v in changes.items():
            setattr(cfg, k, v)
        m = AutoModelForCausalLM.from_pretrained(
            folder, config=cfg, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
        ).eval()
        with torch.no_grad(), _torch_threads(1):
            return m(input_ids=torch.tensor([ids]), use_cache=False).logits[0]

    for family in FAMILIES:
        t = time.time()
        folder = make_checkpoint(family, root)
        build_s = time.time() - t
        desc = describe(folder)
        w = weights(folder)
        V = desc["vocab_size"]
        prompts = random_prompts(2, [7, 70], V, seed=3)
        t = time.time()
        _, logits = hf_greedy(folder, prompts, 16)
        top2 = torch.cat(logits).topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        print(f"== {family}: build {build_s:.2f}s, hf_greedy {time.time() - t:.2f}s, "
              f"top-2 gap min {gap.min():.4f} median {gap.median():.3f}")
        print("   " + json.dumps(desc, sort_keys=True))
        ids = prompts[1]
        base = hf_logits(folder, ids)
        if family == "qwen2_moe":
            assert w["model.layers.0.mlp.shared_expert_gate.weight"] == (1, 64)
            assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in w
            assert desc["shared_expert_intermediate_size"] == 64
        if family == "olmoe":
            assert w["model.layers.0.self_attn.q_norm.weight"] == (64,)  # hidden_size: whole projection
            assert w["model.layers.0.self_attn.k_norm.weight"] == (32,)  # num_kv_heads * head_dim
            assert desc["clip_qkv"] == 2.0
            clipped = logits_with(folder, ids, clip_qkv=None)
            assert not torch.allclose(clipped, base, atol=1e-4), "clip_qkv has no effect"
        if family in ("qwen3", "qwen3_moe"):
            assert w["model.layers.0.self_attn.q_norm.weight"] == (32,)  # head_dim
            assert w["model.layers.0.self_attn.q_proj.weight"] == (128, 64)  # 4 heads * head_dim 32 != hidden
        if family in ("qwen2", "qwen2-yarn", "qwen2_moe"):
            assert "model.layers.0.self_attn.q_proj.bias" in w and "model.layers.0.self_attn.o_proj.bias" not in w
        if family == "mistral":
            assert desc["sliding_window"] == 48
            full = logits_with(folder, ids, sliding_window=None)
            assert torch.allclose(full[:48], base[:48], atol=1e-5)
            assert not torch.allclose(full[48:], base[48:], atol=1e-3), "sliding window has no effect"
        if family == "tinyllama-legacy":
            assert "rope_parameters" not in desc and desc["rope_theta"] == 20000.0
            plain = logits_with(folder, ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
            assert not torch.allclose(plain, base, atol=1e-3), "legacy rope keys have no effect"
        if family in ("llama3", "llama-linear", "qwen2-yarn"):
            theta = desc["rope_parameters"]["rope_theta"]
            plain = logits_with(folder, ids, rope_parameters={"rope_type": "default", "rope_theta": theta})
            assert not torch.allclose(plain, base, atol=1e-3), f"{family} rope scaling has no effect"
        if family in ("smollm", "qwen2", "qwen3"):
            assert desc["tie_word_embeddings"] and "lm_head.weight" not in w
        if family in MOE_FAMILIES:
            # transformers 5 routers (…TopKRouter, not nn.Linear) return (router_logits, scores, indices).
            gaps: list[torch.Tensor] = []

            def hook(_m: Any, _i: Any, out: Any) -> None:
                top = out[0].float().sort(-1, descending=True).values
                gaps.append(top[:, 1] - top[:, 2])

            model = load_hf_model(folder)
            hooks = [
                mod.register_forward_hook(hook)
                for name, mod in model.named_modules()
                if name.endswith(("mlp.gate", "block_sparse_moe.gate"))
            ]
            assert hooks, "no router found"
            hf_logits(folder, ids)
            for h in hooks:
                h.remove()
            g = torch.cat(gaps)
            print(f"   router: 2nd-3rd expert logit gap min {g.min():.5f} median {g.median():.4f} over {g.numel()}")
    print("all checks passed")


if __name__ == "__main__":  # pragma: no cover
    import sys
    import tempfile

    _self_check(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(tempfile.mkdtemp()))
