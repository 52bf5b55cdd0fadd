"""The one place that turns an EngineConfig into objects (policies by name included)."""
from __future__ import annotations

import ctypes
import logging
import sys

import torch

from ferry.config import EngineConfig, ModelConfig, OffloadConfig
from ferry.engine.parts import EngineParts
from ferry.engine.speculation import build_speculator
from ferry.errors import InvalidRequest
from ferry.experts.planner import make_plan, measure_costs
from ferry.experts.policies import EVICTION_POLICIES, SwitchedPolicy
from ferry.experts.predictors import PREDICTORS, ExpertPredictor
from ferry.experts.prefetch import Prefetcher
from ferry.experts.samples import Setting, candidate_settings
from ferry.experts.store import ExpertStore
from ferry.experts.tuner import OffloadTuner, resolve
from ferry.kvcache.manager import KVCacheManager
from ferry.kvcache.policies import KV_POLICIES, KVPolicy, KVShape
from ferry.models.loader import load_model
from ferry.ops import cpu, warm_up
from ferry.runner.kv import BlockLayout, PolicyKV, build_policy_kv
from ferry.runner.runner import Runner
from ferry.sampling import Sampler
from ferry.scheduler.policies import POLICIES
from ferry.scheduler.scheduler import Scheduler
from ferry.tokenizer import Tokenizer

log = logging.getLogger("ferry")


def resolve_dtype(name: str, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the model runs in; ``auto`` picks it (``auto_dtype``) and the choice is logged with its reason."""
    if name == "auto":
        name, why = auto_dtype(model_cfg.checkpoint_dtype, device)
        log.info("dtype %s (auto: %s)", name, why)
    elif name == "bfloat16" and device.type == "cpu" and not cpu.native_bf16():
        log.info("dtype bfloat16: this CPU has no native bfloat16 (%s), so it is widened to float32 in every "
                 "kernel; --dtype float32 (or auto) is exact and usually faster here", cpu.describe())
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise InvalidRequest(f"dtype {name!r} is not supported; use auto, float32 or bfloat16")
    return dtypes[name]


def auto_dtype(checkpoint_dtype: str, device: torch.device) -> tuple[str, str]:
    """(dtype name, why) for ``--dtype auto``: on CPU, bfloat16 only where the CPU computes it natively
    (``cpu.native_bf16``) and the checkpoint is 16-bit; float32 otherwise, which is exact and, where bfloat16 is
    emulated, faster (a bf16 checkpoint on an AVX2 CPU runs float32). Elsewhere the checkpoint's dtype."""
    if device.type != "cpu":
        return checkpoint_dtype, f"the checkpoint is {checkpoint_dtype}"
    if checkpoint_dtype not in ("bfloat16", "float16"):
        return "float32", f"the checkpoint is {checkpoint_dtype}"
    if cpu.native_bf16():
        return "bfloat16", f"this CPU computes bfloat16 natively ({cpu.describe()}); the checkpoint is {checkpoint_dtype}"
    return "float32", f"this CPU has no native bfloat16 ({cpu.describe()}); the checkpoint is {checkpoint_dtype}"


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidRequest(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device cuda was asked for but this torch build has no CUDA device; use --device cpu")
    return device


def _tune_malloc() -> None:
    """Keep freed large buffers in the heap (glibc): a decode step allocates the same multi-MB activations
    every time, and returning them to the OS makes each step pay page faults again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def build_expert_store(cfg: OffloadConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                       max_num_seqs: int) -> tuple[ExpertStore, OffloadTuner] | None:
    """The expert store, and the tuner holding its offload setting (chosen online with `auto`)."""
    if cfg.expert_store is None:
        return None
    if model_cfg.moe is None:
        raise InvalidRequest(f"--expert-store is for MoE models; {model_cfg.architecture} has no experts")
    if device.type != "cpu":
        raise InvalidRequest("--expert-store runs on --device cpu only for now")
    moe_layers = [l for l in range(model_cfg.num_layers) if model_cfg.moe.sparse_layers[l]]
    shape = (moe_layers, model_cfg.moe.num_experts, model_cfg.moe.top_k)
    settings = candidate_settings(cfg.expert_eviction, cfg.expert_prefetch)
    evictions = {s.eviction: EVICTION_POLICIES[s.eviction](*shape) for s in settings}
    first = settings[0].eviction
    policy = evictions[first] if len(evictions) == 1 else SwitchedPolicy(evictions, first)
    store = ExpertStore(cfg.expert_store, model_cfg, dtype, cfg.expert_cache_memory, policy)
    try:
        settings, why = resolve(settings, store)
        tuner = OffloadTuner(store, settings, why, _predictors(cfg, store, settings, shape), cfg.explain)
        if store.prefetcher is not None or cfg.explain:
            plan = make_plan(measure_costs(store), model_cfg.moe.num_experts, model_cfg.moe.top_k, len(moe_layers),
                             store.cache.num_slots, max_num_seqs)
            if store.prefetcher is not None:
                store.prefetcher.width, store.prefetcher.depth = plan.prefetch_width, plan.prefetch_depth
            if cfg.explain:
                print(plan.explain() + "\n" + tuner.describe(), file=sys.stderr, flush=True)
    except BaseException:
        store.close()
        raise
    return store, tuner


def _predictors(cfg: OffloadConfig, store: ExpertStore, settings: list[Setting],
                shape: tuple[list[int], int, int]) -> dict[str, ExpertPredictor]:
    """Prefetch name -> predictor for the settings, held by a prefetcher attached to the store (it watches the
    model's routing once the model is loaded: bind). {} when no setting prefetches: no prefetcher."""
    names = list(dict.fromkeys(s.prefetch for s in settings))
    if names == ["none"]:
        return {}
    predictors = {name: PREDICTORS[name](*shape) for name in names}
    if cfg.expert_correlation_file:
        predictors["correlation"].persist_to(cfg.expert_correlation_file)
    Prefetcher(store, predictors[settings[0].prefetch], choices=list(predictors.values()))
    return predictors


def build_kv_policy(cfg: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype) -> KVPolicy:
    policy_cls = KV_POLICIES[cfg.kv_policy]
    if policy_cls.needs_full_attention and any(w is not None for w in model_cfg.sliding_windows):
        raise InvalidRequest(f"--kv-policy {cfg.kv_policy} needs full-attention layers; this model has "
                             f"sliding-window layers")
    shape = KVShape(model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, cfg.cache.block_size,
                    torch.empty(0, dtype=dtype).element_size())
    return policy_cls(cfg.kv_options, shape)


def kv_block_counts(cfg: EngineConfig, policy: KVPolicy) -> tuple[int, int]:
    """(device blocks, host blocks) the byte budgets buy under the policy. A fast-tier index over host blocks
    (spans) is paid from --kv-cache-memory too, so the reported memory is the memory used."""
    swap = cfg.scheduler.preemption_mode == "swap"
    num_host = cfg.cache.swap_space // policy.host_bytes_per_block() if swap or policy.uses_host_tier else 0
    per_block = policy.device_bytes_per_block()
    num_blocks = (cfg.cache.kv_cache_memory - num_host * policy.index_bytes_per_host_block()) // per_block
    if num_blocks < 1:
        raise InvalidRequest(f"kv_cache_memory={cfg.cache.kv_cache_memory} bytes holds no KV block "
                             f"({per_block} bytes each for this model and --kv-policy {policy.name}); raise "
                             f"--kv-cache-memory" + (" or lower --swap-space" if policy.uses_host_tier else ""))
    return num_blocks, num_host


def check_kv_bytes(policy: KVPolicy, storage: PolicyKV, num_blocks: int, num_host_blocks: int) -> None:
    """The tensors allocated are the blocks the budget bought, at the bytes the policy declares per block."""
    want = (num_blocks * policy.device_bytes_per_block() + num_host_blocks * policy.index_bytes_per_host_block(),
            num_host_blocks * policy.host_bytes_per_block())
    if (storage.nbytes, storage.host_nbytes) != want:
        raise RuntimeError(f"--kv-policy {policy.name} allocated {storage.nbytes} fast / {storage.host_nbytes} host "
                           f"bytes for {num_blocks} + {num_host_blocks} blocks; its declaration says {want[0]} / "
                           f"{want[1]}")


def build_engine_parts(cfg: EngineConfig) -> EngineParts:
    if torch.device(cfg.device).type == "cpu":
        _tune_malloc()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_cfg = ModelConfig.from_hf(cfg.model)
    tokenizer = Tokenizer.load(cfg.model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, model_cfg, device)

    block_size = cfg.cache.block_size
    policy = build_kv_policy(cfg, model_cfg, dtype)
    num_blocks, num_host_blocks = kv_block_counts(cfg, policy)
    # a policy with a slow tier needs only the resident part of a sequence in device blocks
    max_len = min(model_cfg.max_model_len, (num_blocks + num_host_blocks * policy.uses_host_tier) * block_size)
    if cfg.max_model_len:
        max_len = min(max_len, cfg.max_model_len)
    if max_len < model_cfg.max_model_len and not cfg.max_model_len:
        log.info("context capped at %d tokens by the KV cache budget", max_len)

    built = build_expert_store(cfg.offload, model_cfg, dtype, device, cfg.scheduler.max_num_seqs)
    experts, tuner = built if built is not None else (None, None)
    try:
        model = load_model(model_cfg, dtype, device, max_len, experts.layer if experts else None, cfg.quant)
        if experts and experts.prefetcher:
            experts.prefetcher.bind(model)
        if device.type == "cpu":  # load (compile on a miss) every CPU kernel now, not on the first request
            warm_up()
        storage = build_policy_kv(policy, BlockLayout(model_cfg, num_blocks, num_host_blocks, block_size, dtype, device))
        check_kv_bytes(policy, storage, num_blocks, num_host_blocks)
        storage.bind_model(model)
        kv = KVCacheManager(num_blocks, block_size, cfg.cache.enable_prefix_caching, num_host_blocks, policy)
        speculator = build_speculator(cfg, model_cfg, tokenizer, dtype, device, max_len)
        scheduler = Scheduler(cfg.scheduler, kv, POLICIES[cfg.scheduler.policy](), speculator)
        eos = frozenset(tokenizer.eos_token_ids) | frozenset(model_cfg.eos_token_ids)
        runner = Runner(model, storage, Sampler(eos, seed=cfg.seed), block_size, device)
        return EngineParts(cfg, model_cfg, tokenizer, kv, storage, scheduler, runner, max_len, eos, experts,
                           speculator, tuner)
    except BaseException:
        if experts:  # its reader threads and cache must not outlive a failed start
            experts.close()
        raise
