"""Train ferry's in-house models on 2 CPU cores; export them in Hugging Face format.

    python -m modelkit.train all              # ferry-tiny, ferry-tiny-moe, then ferry-tiny-draft
    python -m modelkit.train ferry-tiny       # one model
    python -m modelkit.train ferry-tiny --smoke --out /tmp/x   # 20 tiny steps (what CI runs)

Half of the training rows are ordinary text from the corpus (``modelkit.data``),
the others are RULER-style retrieval tasks (``ferry.eval.tasks``) at random
depths, so the dense model learns to retrieve from anywhere in its context.
The loss is the next-token loss over all tokens plus the mean loss over answer
tokens (so a 5-token answer in 4096 tokens still weighs), plus, for the MoE,
the Switch load-balancing loss. The draft model is distilled from ferry-tiny.
Seeded; the log and a loss-curve PNG go to ``modelkit/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ferry.eval.tasks import TASKS, Haystack, make_sample
from modelkit import data, precision
from modelkit.model import CausalLM, Spec

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "ferry" / "assets"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Phase:
    seq_len: int
    batch: int
    steps: int
    accum: int = 1  # micro-batches per optimizer step (gradient accumulation): long rows, larger effective batch


@dataclass
class Stage:
    """A continuation of a recipe's run: its export trained on with a new optimizer and learning-rate schedule."""

    phases: list[Phase]
    seed: int
    tasks: tuple[str, ...] | None = None  # None: the recipe's
    lr: float | None = None  # None: the recipe's
    split_pad: bool = False  # see Recipe


@dataclass
class Recipe:
    spec: Spec
    phases: list[Phase]
    task_frac: float = 0.5
    repeat_frac: float = 0.0  # rows whose second half repeats the first: a dense copying signal (induction)
    lr: float = 2e-3
    aux_coef: float = 0.02
    answer_weight: float = 2.0  # weight of the mean loss over answer tokens
    teacher: str | None = None  # distil from this model's logits
    on_policy_frac: float = 0.0  # rows that are the teacher's own greedy continuations of corpus prompts
    upcycle: str | None = None  # start from this dense model: shared weights copied, experts from its MLP slices
    tasks: tuple[str, ...] = TASKS
    stages: list[Stage] = field(default_factory=list)  # parts 2, 3...: each continues from the previous export
    # task rows put a random share of their filler text after the answer instead of all of it before the prompt,
    # so a needle also sits at a row's very first tokens (as at depth 0 in `ferry eval`)
    split_pad: bool = False


YARN = {"rope_type": "yarn", "factor": 4.5, "original_max_position_embeddings": 1024}
RECIPES = {
    "ferry-tiny": Recipe(
        # Trained on 4096-token rows; the context allows a 4096-token prompt plus its answer.
        # YaRN (factor 4.5 over 1024 positions): retrieval learnt within ~2K tokens carries to 4K.
        Spec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
             max_position_embeddings=4608, rope_scaling=YARN),
        # Curriculum: text and copying on short rows, then 1024 tokens; each part ends on 4096-token rows at a low
        # learning rate, which show YaRN's low frequencies the angles of 4096-token distances.
        [Phase(256, 32, 700), Phase(1024, 8, 700), Phase(4096, 2, 150)], repeat_frac=0.3,
        # Part 1 learns text and copying (perplexity 73) but not yet retrieval; part 2, a restarted schedule on
        # passkey and multi-key rows only (twice their share), makes it appear within ~150 steps (passkey 92.5% at
        # 4K, perplexity 47); part 3, at a quarter of the learning rate with the needle also at a row's first
        # tokens (filler also after the answer), 96.7% at 4K over 24 prompts per depth (perplexity 44); part 4,
        # 4096-token passkey rows only, misses 1 of 40 prompts at depths 0 and 0.5 and none at the others over three
        # eval seeds (perplexity 42.6; modelkit/README.md).
        stages=[Stage([Phase(256, 32, 400), Phase(1024, 8, 400), Phase(4096, 2, 200)], seed=4,
                      tasks=("passkey", "multikey")),
                Stage([Phase(1024, 8, 100), Phase(4096, 2, 200)], seed=5, tasks=("passkey", "multikey"), lr=5e-4,
                      split_pad=True),
                Stage([Phase(4096, 2, 200)], seed=6, tasks=("passkey",), lr=3e-4, split_pad=True)],
    ),
    "ferry-tiny-moe": Recipe(
        # Sparse upcycling of ferry-tiny: same attention and embeddings, 8 experts of 192 neurons each.
        Spec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=192,
             num_experts=8, top_k=2, max_position_embeddings=4608, rope_scaling=YARN),
        [Phase(512, 16, 200)], task_frac=0.2, repeat_frac=0.2, aux_coef=0.1, upcycle="ferry-tiny",
    ),
    "ferry-tiny-draft": Recipe(
        # Half the rows are ferry-tiny's own greedy continuations: a draft is judged on exactly those.
        Spec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=384),
        [Phase(256, 32, 400)], task_frac=0.0, repeat_frac=0.1, teacher="ferry-tiny", on_policy_frac=0.5,
    ),
}


class _Tok:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        self.t = Tokenizer.from_file(str(path))
        self.eos = self.t.token_to_id("</s>")

    def encode(self, s: str) -> list[int]:
        return self.t.encode(s).ids


def make_batch(recipe: Recipe, tok: _Tok, hay: Haystack, rng: random.Random, phase: Phase,
               pool: list[list[int]] | None = None):
    """Rows of seq_len+1 tokens, an answer mask and each row's task ('' for text). ``pool``: the teacher's
    greedy continuations (PROMPT_LEN corpus tokens, then generated ones), drawn for on_policy_frac of the rows."""
    rows, masks, kinds = [], [], []
    n = phase.seq_len + 1
    for _ in range(phase.batch):
        u = rng.random()
        if pool and u < recipe.on_policy_frac:  # the draft learns the target's greedy choices: its tokens weigh double
            row = rng.choice(pool)[:n]
            rows.append(row); masks.append([0] * PROMPT_LEN + [1] * (n - PROMPT_LEN)); kinds.append("on-policy")
            continue
        u = rng.random()
        if u < recipe.repeat_frac:
            half = hay.take((n + 1) // 2, rng)
            row = (half + half)[:n]
            rows.append(row); masks.append([0] * len(half) + [1] * (n - len(half))); kinds.append("repeat")
        elif u < recipe.repeat_frac + recipe.task_frac:
            task = rng.choice(recipe.tasks)
            s = make_sample(task, tok, hay, rng, phase.seq_len - 24, rng.random())
            ids = s.prompt_ids + s.answer_ids + [tok.eos]
            pad = hay.take(n - len(ids), rng)
            cut = rng.randrange(len(pad) + 1) if recipe.split_pad else len(pad)
            row = pad[:cut] + ids + pad[cut:]
            mask = [0] * (cut + len(s.prompt_ids)) + [1] * len(s.answer_ids) + [0] * (1 + len(pad) - cut)
            rows.append(row[:n]); masks.append(mask[:n]); kinds.append(task)
        else:
            rows.append(hay.take(n, rng)); masks.append([0] * n); kinds.append("")
    x = torch.tensor(rows)
    # mask[t] marks token t as an answer token; it is predicted at position t-1.
    return x[:, :-1], x[:, 1:], torch.tensor(masks)[:, 1:].bool(), kinds


PROMPT_LEN = 64  # corpus tokens before the teacher's continuation (as in `ferry eval`'s acceptance rate)
POOL_ROWS = 3000  # teacher continuations generated once, before training


def teacher_pool(folder: Path, hay: Haystack, rng: random.Random, num_rows: int, seq_len: int) -> list[list[int]]:
    """The teacher checkpoint in ``folder`` continues ``num_rows`` corpus prompts greedily (run by ferry itself:
    minutes, where the training model without a KV cache would take hours); rows of seq_len+1 tokens."""
    from ferry import LLM, SamplingParams

    prompts = [hay.take(PROMPT_LEN, rng) for _ in range(num_rows)]
    llm = LLM(str(folder), dtype="float32", kv_cache_memory="512M")
    params = SamplingParams(max_tokens=seq_len + 1 - PROMPT_LEN, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]


def load_trained(name: str, folder: Path | None = None) -> CausalLM:
    """The exported checkpoint of recipe ``name`` (from ``folder``, default ferry/assets/NAME) as a CausalLM."""
    m = CausalLM(RECIPES[name].spec)
    sd = {k: v.float() for k, v in load_file((folder or ASSETS / name) / "model.safetensors").items()}
    m.load_state_dict(sd, strict=False)
    if m.spec.tie_word_embeddings:
        assert torch.equal(m.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    return m.eval()


def upcycle(moe: CausalLM, dense: CausalLM, seed: int) -> None:
    """Sparse upcycling: every weight the two share is copied; expert e of a layer takes neuron slice
    e mod (I_dense / I_expert) of the dense MLP (plus a little noise, so copies of a slice can diverge)."""
    g = torch.Generator().manual_seed(seed)
    shared = dense.state_dict()
    own = moe.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            if k in shared and shared[k].shape == v.shape:
                v.copy_(shared[k])
        n = moe.spec.intermediate_size
        slices = dense.spec.intermediate_size // n
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            for e, expert in enumerate(layer.block_sparse_moe.experts):
                rows = slice((e % slices) * n, (e % slices + 1) * n)
                for dst, src in ((expert.w1.weight, mlp.gate_proj.weight[rows]), (expert.w3.weight, mlp.up_proj.weight[rows]),
                                 (expert.w2.weight, mlp.down_proj.weight[:, rows] * slices)):
                    dst.copy_(src + 0.01 * src.std() * torch.randn(src.shape, generator=g))


def export(model: CausalLM, out: Path, tokenizer: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.export_state(), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.spec.hf_config(), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    data.write_tokenizer(tokenizer, out)



def _micro_step(model, teacher, recipe: Recipe, tok: _Tok, hay: Haystack, rng: random.Random, phase: Phase,
                pool: list[list[int]] | None):
    """One micro-batch's forward pass and loss."""
    x, y, amask, kinds = make_batch(recipe, tok, hay, rng, phase, pool)
    with precision.autocast():  # bf16 where the CPU has it natively, else float32
        logits = model(x)
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view_as(y)
    loss = ce.mean()
    if amask.any():
        loss = loss + recipe.answer_weight * ce[amask].mean()
    if recipe.spec.num_experts:
        loss = loss + recipe.aux_coef * model.aux_loss()
    if teacher is not None:
        with torch.no_grad(), precision.autocast():
            t_logits = teacher(x).float()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
        loss = 0.5 * loss + 0.5 * kl / y.shape[1]
    return x, y, amask, kinds, logits, ce, loss


def train(name: str, out: Path, smoke: bool = False, seed: int = 0, threads: int = 2,
          init: Path | None = None, phases: list[Phase] | None = None, tag: str = "", models: Path = ASSETS,
          recipe: Recipe | None = None) -> dict:
    """Train ``name`` by its recipe (or the given recipe, or phases), from scratch or from the checkpoint in
    ``init``. The models a recipe builds on (upcycling, teacher) are read from ``models``. Stages are main's."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    recipe = recipe or RECIPES[name]
    if smoke:  # no corpus download: the bundled held-out text, and a small tokenizer trained on it
        phases = [Phase(320, 2, 10), Phase(400, 2, 10)]
        tok = _Tok(data.train_tokenizer([ASSETS / "heldout.txt"], out / "smoke-tokenizer.json", 1024))
        hay = Haystack(tok.encode((ASSETS / "heldout.txt").read_text()))
    else:
        phases = phases or recipe.phases
        tok = _Tok(data.build_tokenizer())
        hay = Haystack(data.token_ids("train"))
    model = load_trained(name, init) if init else CausalLM(recipe.spec)
    if recipe.upcycle and not init and not smoke:
        upcycle(model, load_trained(recipe.upcycle, models / recipe.upcycle), seed)
    model.train()
    teacher = None
    if recipe.teacher:  # smoke: a random teacher of the right shape exercises the distillation path
        teacher = (CausalLM(RECIPES[recipe.teacher].spec).eval() if smoke
                   else load_trained(recipe.teacher, models / recipe.teacher))
    pool = None
    if teacher is not None and recipe.on_policy_frac:
        folder = models / recipe.teacher
        if smoke:
            export(teacher, folder := out / "smoke-teacher", tok.path)
        pool = teacher_pool(folder, hay, rng, 8 if smoke else POOL_ROWS, max(p.seq_len for p in phases))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total = sum(p.steps for p in phases)
    warm = max(1, min(50, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    )
    log: list[dict] = []
    t0 = time.time()
    bar = tqdm(total=total, desc=name, unit="step")
    step = 0
    for phase in phases:
        for _ in range(phase.steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(phase.accum):
                x, y, amask, kinds, logits, ce, loss = _micro_step(model, teacher, recipe, tok, hay, rng, phase, pool)
                (loss / phase.accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == total:
                rec = {"step": step, "seq_len": phase.seq_len, "loss": loss.item(),
                       "text_loss": ce[~amask].mean().item(), "elapsed_s": round(time.time() - t0, 1)}
                with torch.no_grad():
                    hit = (logits.argmax(-1) == y) | ~amask
                rec["answer_token_acc"] = ((logits.argmax(-1) == y) & amask).sum().item() / max(1, amask.sum().item())
                for task in set(kinds) - {"", "repeat"}:
                    rows = [i for i, k in enumerate(kinds) if k == task]
                    rec[f"acc_{task}"] = hit[rows].all(-1).float().mean().item()
                log.append(rec)
                tqdm.write(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                bar.set_postfix(loss=f"{rec['loss']:.3f}", text=f"{rec['text_loss']:.3f}")
    bar.close()
    model.eval()
    export(model, out, tok.path)
    summary = {"model": name, "seed": seed, "init": str(init) if init else None, "steps": total, "threads": threads,
               "compute_dtype": str(precision.train_dtype()).removeprefix("torch."),
               "train_minutes": round((time.time() - t0) / 60, 1), "spec": recipe.spec.to_dict(),
               "phases": [vars(p) for p in phases], "log": log}
    if not smoke:
        RESULTS.mkdir(exist_ok=True)
        stem = f"{name}-{tag}" if tag else name
        (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        plot(summary, RESULTS / f"{stem}-loss.png")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = summary["log"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in log]
    ax[0].plot(steps, [r["loss"] for r in log], label="total loss")
    ax[0].plot(steps, [r["text_loss"] for r in log], label="text next-token loss")
    ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].legend(); ax[0].set_title(summary["model"])
    for task in TASKS:
        pts = [(r["step"], r[f"acc_{task}"]) for r in log if f"acc_{task}" in r]
        if pts:
            ax[1].plot(*zip(*pts), ".", alpha=0.5, label=task)
    ax[1].set_xlabel("step"); ax[1].set_ylabel("answer exact (teacher-forced, per batch)"); ax[1].legend()
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=[*RECIPES, "all"])
    p.add_argument("--out", type=Path, help="output folder (default ferry/assets/MODEL)")
    p.add_argument("--smoke", action="store_true", help="20 steps on short rows: checks the loop, not the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the log and plot names in modelkit/results/")
    p.add_argument("--repeat-frac", type=float, help="override the recipe's share of repeated-span rows")
    p.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    p.add_argument("--rope-scaling", type=json.loads, metavar="JSON",
                   help='set HF rope_scaling, e.g. \'{"rope_type": "yarn", "factor": 4.5, "original_max_position_embeddings": 1024}\'')
    p.add_argument("--init", type=Path, help="continue from this checkpoint folder instead of from scratch")
    p.add_argument("--models", type=Path, help="folder of the models a recipe builds on (upcycling, teacher; "
                   "default ferry/assets, or DIR with `all --out DIR`)")
    p.add_argument("--tasks", help="comma-separated retrieval tasks to train on (default: the recipe's)")
    p.add_argument("--split-pad", action="store_true", help="task rows: part of the filler after the answer "
                   "(needles also at a row's first tokens)")
    p.add_argument("--phase", action="append", metavar="SEQ_LEN,BATCH,STEPS[,ACCUM]",
                   help="train these phases instead of the recipe's (repeatable)")
    a = p.parse_args(argv)
    phases = [Phase(*map(int, x.split(","))) for x in a.phase] if a.phase else None
    for name in RECIPES if a.model == "all" else [a.model]:
        if a.repeat_frac is not None:
            RECIPES[name].repeat_frac = a.repeat_frac
        if a.lr is not None:
            RECIPES[name].lr = a.lr
        if a.tasks:
            RECIPES[name].tasks = tuple(a.tasks.split(","))
        if a.rope_scaling is not None:
            RECIPES[name].spec.rope_scaling = a.rope_scaling
        if a.split_pad:
            RECIPES[name].split_pad = True
        out = a.out / name if a.out and a.model == "all" else a.out or ASSETS / name
        models = a.models or (a.out if a.out and a.model == "all" else ASSETS)  # `all --out DIR`: its own outputs
        s = train(name, out, a.smoke, a.seed, a.threads, a.init, phases, a.tag, models)
        print(f"{name}: {s['steps']} steps in {s['train_minutes']} min -> {out}")
        recipe = RECIPES[name]
        for i, stage in enumerate([] if phases else recipe.stages, start=2):  # part 1 is the phases
            staged = replace(recipe, phases=stage.phases, tasks=stage.tasks or recipe.tasks, lr=stage.lr or recipe.lr,
                             split_pad=stage.split_pad)
            tag = f"{a.tag}-part{i}" if a.tag else f"part{i}"
            s = train(name, out, a.smoke, stage.seed, a.threads, out, None, tag, models, staged)
            print(f"{name} part {i}: {s['steps']} steps in {s['train_minutes']} min -> {out}")


if __name__ == "__main__":
    main()
