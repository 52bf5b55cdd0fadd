"""Engine options, defined once: `ferry generate/chat/serve` flags and `ferry.LLM(...)` keywords come from
this table (a flag --kv-cache-memory is the keyword kv_cache_memory=)."""
from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferry.config import (
    CacheConfig,
    EngineConfig,
    KVOptions,
    OffloadConfig,
    QuantConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KV_POLICIES

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '512M', '2G', '1.5GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise InvalidRequest(f"cannot read {value!r} as a size; use bytes or a number with K, M or G (e.g. 512M)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 0:
        raise InvalidRequest(f"size must be >= 0, got {value!r}")
    return size


INSTANCE_ROLES = ("prefill", "decode")


def parse_instance_roles(value: str | None) -> tuple[str, ...] | None:
    """--instance-roles prefill:N,decode:M -> one role per instance (prefill ones first)."""
    if value is None or isinstance(value, tuple):
        return value
    counts: dict[str, int] = {}
    for part in str(value).split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*:\s*([0-9]+)\s*", part)
        if not m or m.group(1) not in INSTANCE_ROLES or m.group(1) in counts or int(m.group(2)) < 1:
            raise InvalidRequest(f"instance_roles {value!r}: write each role once with a count >= 1, as "
                                 f"prefill:N,decode:M (e.g. prefill:1,decode:1); roles: {', '.join(INSTANCE_ROLES)}")
        counts[m.group(1)] = int(m.group(2))
    if set(counts) != set(INSTANCE_ROLES):
        raise InvalidRequest(f"instance_roles {value!r} needs both roles, prefill:N and decode:M: prompts run on "
                             f"the prefill instances and each request then decodes on a decode instance")
    return tuple(role for role in INSTANCE_ROLES for _ in range(counts[role]))


@dataclass(frozen=True)
class Option:
    name: str  # keyword name; the flag is --name-with-dashes
    default: Any
    type: Callable[[str], Any]
    help: str
    choices: tuple | None = None


def _bool(v: str | bool) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")


def _num_speculative_tokens(v: str | int) -> int | None:
    """`auto` (None: chosen per step) or a count >= 1."""
    if v is None or str(v).lower() == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        raise InvalidRequest(f"num_speculative_tokens must be auto or a number >= 1, got {v!r}") from None
    if not 1 <= n <= 16:
        raise InvalidRequest(f"num_speculative_tokens must be auto or 1..16, got {n}")
    return n


def kv_policy_options() -> list[Option]:
    """The kv_<field> options, one per field of the registered policies' options (a field several policies read is
    one option: the same default, each reading's help after the policies that read it that way)."""
    helps: dict[str, dict[str, list[str]]] = {}  # field -> help -> policies
    first: dict[str, dataclasses.Field] = {}
    for name, cls in KV_POLICIES.items():
        for f in dataclasses.fields(cls.Options):
            if f.name in first and first[f.name].default != f.default:
                raise TypeError(f"KV option {f.name} has two defaults: {first[f.name].default!r}, {f.default!r}")
            first.setdefault(f.name, f)
            helps.setdefault(f.name, {}).setdefault(f.metadata["help"], []).append(name)
    return [Option(f"kv_{n}", f.default, f.metadata["parse"],
                   ". ".join(f"{', '.join(names)}: {text}" for text, names in helps[n].items()))
            for n, f in first.items()]


KV_OPTIONS: tuple[Option, ...] = tuple(kv_policy_options())
ENGINE_OPTIONS: tuple[Option, ...] = (
    Option("dtype", "auto", str, "weight and activation dtype (auto: bfloat16 for a 16-bit checkpoint where the CPU computes bfloat16 natively, "
           "float32 otherwise; logged at start)",
           ("auto", "float32", "bfloat16")),
    Option("quantization", None, str, "weight-only quantization of the decoder's linears at load: int8 (per output "
           "channel) or int4 (group-wise, group size chosen per matrix from its error); activations stay in --dtype. "
           "A folder from `ferry convert --quantization` is already quantized", ("int8", "int4")),
    Option("quantization_group_size", None, int, "with --quantization: inputs per scale for every matrix (a multiple "
           "of 32; None: int8 per channel, int4 chosen per matrix)"),
    Option("quantization_lm_head", None, str, "with --quantization: the lm_head's precision (a tied model's "
           "embedding table, which is its head): int8 per channel (default, under int4 too, as llama.cpp keeps its "
           "output tensor above Q4_0), int4, or none (kept in --dtype). A converted folder keeps its own",
           ("int8", "int4", "none")),
    Option("device", "cpu", str, "torch device: cpu, or cuda where torch has it"),
    Option("threads", None, int, "torch intra-op threads (default: torch's choice)"),
    Option("max_model_len", None, int, "context length cap (default: the model's, limited by the KV cache)"),
    Option("seed", 0, int, "seed of the generator used by requests without their own seed"),
    Option("kv_cache_memory", "1G", parse_size, "bytes for the KV cache (e.g. 512M, 2G); never exceeded"),
    Option("block_size", 16, int, "tokens per KV block"),
    Option("swap_space", "1G", parse_size, "host bytes for KV swapped out on preemption (with --preemption-mode swap) "
           "and for the cold spans of --kv-policy spans"),
    Option("enable_prefix_caching", True, _bool, "share KV blocks of common prompt prefixes between requests"),
    Option("max_num_batched_tokens", None, int, "token budget per engine step (prefill chunks + decodes); default "
           "512, 4096 with --kv-policy lazy (it ranks a chunk's tokens by the chunk's last ones)"),
    Option("max_num_seqs", 64, int, "most requests running at once"),
    Option("max_waiting", 1024, int, "most requests queued; more are refused as overloaded"),
    Option("scheduling_policy", "fcfs", str, "order of admission and preemption (fair: equal shares of tokens per client, "
           "the request's `user`, over a sliding window; over-served clients are preempted)", ("fcfs", "priority", "fair")),
    Option("preemption_mode", "recompute", str, "what happens to the KV of a preempted request", ("recompute", "swap")),
    Option("kv_policy", "full", str, "what the KV cache keeps and a query reads: "
           + ", ".join(cls.summary for cls in KV_POLICIES.values()), tuple(KV_POLICIES)),
    *KV_OPTIONS,
    Option("expert_store", None, str, "MoE: read experts on demand from this folder (`ferry convert MODEL --expert-store DIR`)"),
    Option("expert_cache_memory", None, parse_size, "MoE with --expert-store: bytes of RAM for cached experts "
           "(e.g. 256M; default: all experts); never exceeded"),
    Option("expert_eviction", "auto", str, "MoE with --expert-store: which cached expert to evict; auto: lru or "
           "correlation, whichever measures faster per decode batch size (see --expert-prefetch auto)",
           ("auto", "lru", "correlation")),
    Option("expert_prefetch", "auto", str, "MoE with --expert-store: how the next layer's experts are predicted and "
           "read ahead; auto: none or pregate, chosen online per decode batch size from measured time per token (the "
           "simplest setting unless another is clearly faster; switches logged, --explain says why)",
           ("auto", "none", "correlation", "pregate")),
    Option("explain", False, _bool, "MoE with --expert-store: print the I/O-compute plan (measured disk and compute "
           "costs, prefetch width, recommended sequences per step) at start, and what auto chooses and why"),
    Option("expert_correlation_file", None, str, "MoE with --expert-prefetch correlation: JSON of co-activation "
           "statistics, loaded at start if it exists and saved at shutdown"),
    Option("speculative_method", None, str, "speculative decoding (output unchanged, see README): ngram (prompt "
           "lookup in the request's own context), draft (a small model, --speculative-model), phrase (a pool of "
           "verified phrases kept across requests); route: LOSSY R2R, the small model --speculative-model "
           "generates and a router sends only the tokens it flags to the model (--route-threshold); default: none",
           ("ngram", "draft", "phrase", "route")),
    Option("num_speculative_tokens", "auto", _num_speculative_tokens, "with --speculative-method: draft tokens a "
           "request verifies per step at most; auto: chosen per step from measured acceptance and step cost, 0 when "
           "it would not pay (large batches)"),
    Option("speculative_model", None, str, "with --speculative-method draft or route: the draft (small) model's "
           "folder (same tokenizer as the model)"),
    Option("prompt_lookup_min", 2, int, "with --speculative-method ngram or phrase: shortest n-gram matched"),
    Option("prompt_lookup_max", 5, int, "with --speculative-method ngram or phrase: longest n-gram matched"),
    Option("route_threshold", 0.5, float, "with --speculative-method route: the model (not the small one) makes "
           "each token whose router score (estimated chance the small model's token diverges) is at least this; "
           "0: every token (the model's own greedy output), 1: none (the small model's)"),
    Option("route_router", None, str, "with --speculative-method route: a router file calibrated on the pair "
           "(`python -m bench route --calibrate-only`); default: score = 1 - the small model's top-1 probability"),
    Option("instance_roles", None, parse_instance_roles, "ferry serve: split prompts and decoding over engine "
           "instances (Splitwise, vLLM's disaggregated prefill), e.g. prefill:1,decode:1 (as many instances as it "
           "names, on Ray): a request's prompt runs on a prefill instance, then its KV moves to a decode instance "
           "(one stop-and-copy) where it decodes; default: every instance does both"),
)
_BY_NAME = {o.name: o for o in ENGINE_OPTIONS}


def engine_config(model: str, **kwargs: Any) -> EngineConfig:
    """EngineConfig from keyword options (the same names as the CLI flags). Unknown names are an error."""
    unknown = set(kwargs) - set(_BY_NAME)
    if unknown:
        raise TypeError(f"unknown engine option(s) {sorted(unknown)}; known: {sorted(_BY_NAME)}")
    v = {o.name: o.default for o in ENGINE_OPTIONS}
    v.update({k: x for k, x in kwargs.items()})
    for o in ENGINE_OPTIONS:
        if v[o.name] is not None and o.type is not str:
            v[o.name] = o.type(v[o.name])
        if o.choices and v[o.name] is not None and v[o.name] not in o.choices:
            raise InvalidRequest(f"{o.name} must be one of {', '.join(o.choices)}, got {v[o.name]!r}")
    if v["max_num_batched_tokens"] is None:
        v["max_num_batched_tokens"] = KV_POLICIES[v["kv_policy"]].default_step_tokens
    for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "max_waiting"):
        if v[name] < 1:
            raise InvalidRequest(f"{name} must be >= 1, got {v[name]}")
    if v["expert_store"] is None and (v["expert_cache_memory"] is not None or v["expert_prefetch"] != "auto"
                                      or v["expert_eviction"] != "auto" or v["explain"]):
        raise InvalidRequest("expert_cache_memory, expert_eviction, expert_prefetch and explain need expert_store")
    if v["expert_correlation_file"] is not None and v["expert_prefetch"] != "correlation":
        raise InvalidRequest("expert_correlation_file needs expert_prefetch=correlation")
    if v["instance_roles"] is not None:
        raise InvalidRequest("instance_roles splits prompts and decoding over several engine instances: "
                             "`ferry serve MODEL --instance-roles prefill:1,decode:1`; one engine (LLM, ferry "
                             "generate) does both")
    kv_policy = KV_POLICIES[v["kv_policy"]]
    speculative = _speculative(v, kv_policy)
    return EngineConfig(
        model=str(model), device=v["device"], dtype=v["dtype"], threads=v["threads"],
        max_model_len=v["max_model_len"], seed=v["seed"],
        cache=CacheConfig(block_size=v["block_size"], kv_cache_memory=v["kv_cache_memory"],
                          swap_space=v["swap_space"], enable_prefix_caching=v["enable_prefix_caching"]),
        scheduler=SchedulerConfig(max_num_batched_tokens=v["max_num_batched_tokens"], max_num_seqs=v["max_num_seqs"],
                                  max_waiting=v["max_waiting"], policy=v["scheduling_policy"],
                                  preemption_mode=v["preemption_mode"],
                                  whole_prompts=kv_policy.whole_prompts),
        offload=OffloadConfig(expert_store=v["expert_store"], expert_cache_memory=v["expert_cache_memory"],
                              expert_eviction=v["expert_eviction"], expert_prefetch=v["expert_prefetch"],
                              explain=v["explain"], expert_correlation_file=v["expert_correlation_file"]),
        kv_policy=kv_policy.name, kv_options=_kv_options(v), speculative=speculative,
        quant=_quant_config(v),
    )


def _speculative(v: dict[str, Any], kv_policy: Any) -> SpeculativeConfig:
    """The speculative_* options, checked against each other and the KV policy."""
    method = v["speculative_method"]
    given = [name for name in ("speculative_model", "route_router") if v[name] is not None]
    given += [name for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "route_threshold")
              if v[name] != _BY_NAME[name].type(_BY_NAME[name].default)]
    if method is None:
        if given:
            raise InvalidRequest(f"{', '.join(given)} needs speculative_method (ngram, draft, phrase or route)")
        return SpeculativeConfig()
    _check_route(method, v, given)
    if method in ("draft", "route") and v["speculative_model"] is None:
        raise InvalidRequest(f"speculative_method={method} needs speculative_model (the "
                             f"{'draft' if method == 'draft' else 'small'} model's folder)")
    if method not in ("draft", "route") and v["speculative_model"] is not None:
        raise InvalidRequest(f"speculative_model is for speculative_method=draft or route, not {method}")
    if not 1 <= v["prompt_lookup_min"] <= v["prompt_lookup_max"]:
        raise InvalidRequest(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {v['prompt_lookup_min']} and "
                             f"{v['prompt_lookup_max']}")
    if not kv_policy.supports_rollback:
        able = ", ".join(n for n, cls in KV_POLICIES.items() if cls.supports_rollback)
        raise InvalidRequest(f"--kv-policy {kv_policy.name} cannot take back the KV of rejected draft tokens, so it "
                             f"cannot run speculative decoding; use --kv-policy {able}, or no --speculative-method")
    return SpeculativeConfig(method, v["num_speculative_tokens"], v["speculative_model"], v["prompt_lookup_min"],
                             v["prompt_lookup_max"], v["route_threshold"], v["route_router"])


def _check_route(method: str, v: dict[str, Any], given: list[str]) -> None:
    """The route_* options belong to route, the prompt_lookup_* ones to ngram and phrase."""
    own = [name for name in given if name.startswith("route_")]
    if method != "route" and own:
        raise InvalidRequest(f"{', '.join(own)} is for speculative_method=route, not {method}")
    lookup = [name for name in given if name.startswith("prompt_lookup_")]
    if method == "route" and lookup:
        raise InvalidRequest(f"{', '.join(lookup)} is for speculative_method ngram or phrase, not route")
    if not 0.0 <= v["route_threshold"] <= 1.0:
        raise InvalidRequest(f"route_threshold must be in [0, 1] (0: every token to the model, 1: none), got "
                             f"{v['route_threshold']}")


def _quant_config(v: dict[str, Any]) -> QuantConfig:
    group = v["quantization_group_size"]
    if group is not None and v["quantization"] is None:
        raise InvalidRequest("quantization_group_size needs quantization (int8 or int4)")
    if group is not None and (group < 32 or group % 32):
        raise InvalidRequest(f"quantization_group_size must be a multiple of 32 (32, 64, 128, ...), got {group}")
    if v["quantization_lm_head"] is not None and v["quantization"] is None:
        raise InvalidRequest("quantization_lm_head needs quantization (int8 or int4)")
    return QuantConfig(method=v["quantization"], group_size=group, lm_head=v["quantization_lm_head"])


def _kv_options(v: dict[str, Any]) -> KVOptions:
    """The kv_* options as the chosen policy's own options; an option it does not read is an error, not ignored."""
    name = v["kv_policy"]
    reads = {f.name for f in dataclasses.fields(KV_POLICIES[name].Options)}
    given = {o.name.removeprefix("kv_"): v[o.name] for o in KV_OPTIONS if v[o.name] != o.default}
    unused = sorted(f"kv_{f}" for f in given if f not in reads)
    if unused:
        known = ", ".join(sorted(f"kv_{f}" for f in reads)) or "no kv_* option"
        users = sorted(p for p, cls in KV_POLICIES.items()
                       if all(f.removeprefix("kv_") in {g.name for g in dataclasses.fields(cls.Options)} for f in unused))
        fix = f"choose a kv_policy that reads it ({', '.join(users)})" if users else "leave it out"
        raise InvalidRequest(f"{', '.join(unused)} does not apply to kv_policy={name} (it reads {known}): {fix}")
    return KV_POLICIES[name].Options(**given)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for o in ENGINE_OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        if o.type is _bool:
            group.add_argument(flag, default=o.default, action=argparse.BooleanOptionalAction, help=o.help)
        else:
            # parsed later, where their errors are ours (argparse would replace the message)
            group.add_argument(flag, default=o.default,
                               type=o.type if o.type not in (parse_size, parse_instance_roles) else str,
                               choices=o.choices, help=f"{o.help} (default: {o.default})")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {o.name: getattr(args, o.name) for o in ENGINE_OPTIONS}
