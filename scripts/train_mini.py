"""Train the mini Qwen3-Omni thinker shipped in data/mini with q3lab's own model code, and evaluate a saved one.

    # on a GPU (the lent device), after scripts/build_corpus.py: train and write the official layout
    python scripts/train_mini.py train --corpus data/corpus --out OUT/mini --minutes 7
    # on the CPU: evaluate the written checkpoint through q3lab.load (the numbers of data/mini/README.md)
    python scripts/train_mini.py evaluate data/mini --corpus data/corpus --json eval.json

The model is `q3lab.runtime.thinker.Thinker` (attention, QK-norm, mRoPE, router, norms, lm_head as q3lab runs them). Its
experts are `nn.Parameter` stacks [L, E, I, D] / [L, E, D, I] in an `ExpertBank`, served by a q3lab expert provider. For
speed, training swaps each layer's `Experts` for `DenseExperts`: every expert on every token, weighted by the
sparse top-k weights (zero for experts not chosen), which is the same function as three matmuls; the script
checks the two against each other before training, and `evaluate` recomputes the validation loss through
`q3lab.load` (sparse, per expert) to confirm the saved checkpoint.

Dimensions: N tokens, D hidden, E experts, A top-k, I expert intermediate, L layers, V vocabulary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3lab.base.config import ThinkerConfig, expert_key  # noqa: E402
from q3lab.errors import CheckpointError, InputError  # noqa: E402
from q3lab.runtime.experts import ExpertProvider  # noqa: E402
from q3lab.runtime.thinker import Experts, Thinker  # noqa: E402

DOMAINS = ("code", "license", "facts", "math")
DOMAIN_WEIGHTS = {"code": 0.4, "license": 0.1, "facts": 0.3, "math": 0.2}

# The Qwen3-Omni thinker text config scaled down, every feature kept: 48 layers, QK-norm, GQA (4 q / 2 kv heads),
# interleaved mRoPE with [24, 20, 20] scaled to head_dim 32, 32 experts with top-4 and norm_topk_prob, untied
# lm_head. 9.79 M parameters: 19.6 MB in bf16.
MINI = dict(vocab_size=4096, hidden_size=96, num_hidden_layers=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=16, norm_topk_prob=True,
            rms_norm_eps=1e-6, rope_theta=1_000_000.0, mrope_section=[6, 5, 5], mrope_interleaved=True,
            max_position_embeddings=4096, tie_word_embeddings=False)


# -- experts as trainable parameters ---------------------------------------------------------------
class ExpertBank(nn.Module):
    """Every expert of every layer as trainable stacks: gate/up [L, E, I, D], down [L, E, D, I]."""

    def __init__(self, config: ThinkerConfig):
        super().__init__()
        L, E, I, D = (config.num_hidden_layers, config.num_experts, config.moe_intermediate_size,
                      config.hidden_size)
        self.gate = nn.Parameter(torch.empty(L, E, I, D))
        self.up = nn.Parameter(torch.empty(L, E, I, D))
        self.down = nn.Parameter(torch.empty(L, E, D, I))


class BankProvider(ExpertProvider):
    """A q3lab expert provider serving slices of an ExpertBank (autograd flows through them).

    A plain object, not a module, so that q3lab's `Experts.provider` does not register the bank a second time.
    """

    def __init__(self, bank: ExpertBank):
        self.bank = bank

    def weights(self, layer: int, e: int):
        return self.bank.gate[layer, e], self.bank.up[layer, e], self.bank.down[layer, e]


class DenseExperts(Experts):
    """Training stand-in for q3lab's `Experts`: all E experts on all N tokens, scaled by the dense [N, E] weights.

    Unchosen experts get weight 0, so the output equals the sparse sum. Also leaves the layer's Switch-style
    load-balancing loss in `self.aux` (E * sum_e f_e * P_e: 1.0 when routing is uniform). f and P are taken over
    all N = batch x seq tokens of the step: with one GPU and no gradient accumulation that is the global batch
    (Qwen3-MoE's global-batch balancing), not a per-sequence or micro-batch loss.
    """

    def __init__(self, config: ThinkerConfig, layer_idx: int, bank: ExpertBank, router: nn.Linear):
        super().__init__(config, layer_idx)
        self.parts = (bank, router)      # a tuple: not registered again as submodules
        self.aux: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bank, router = self.parts
        N, D = h.shape
        l, E = self.layer_idx, self.num_experts
        I = bank.gate.shape[2]
        dense_w = torch.zeros(N, E, dtype=w.dtype, device=h.device).scatter(1, idx, w)             # [N, E]
        g = F.linear(h, bank.gate[l].reshape(E * I, D))                                              # [N, E*I]
        u = F.linear(h, bank.up[l].reshape(E * I, D))                                                # [N, E*I]
        a = (F.silu(g) * u).view(N, E, I) * dense_w[:, :, None]                                      # [N, E, I]
        y = F.linear(a.reshape(N, E * I), bank.down[l].permute(1, 0, 2).reshape(D, E * I))           # [N, D]
        if self.training:
            probs = torch.softmax(router(h).float(), dim=-1)                                         # [N, E]
            chosen = torch.zeros(N, E, device=h.device).scatter(1, idx, 1.0)                         # [N, E]
            f = chosen.mean(0) / idx.shape[1]
            self.aux = E * (f * probs.mean(0)).sum()
        return y


def build_model(config: ThinkerConfig, *, dense: bool = True) -> Thinker:
    """A q3lab Thinker with its experts in an `ExpertBank` (`model.expert_bank`)."""
    model = Thinker(config)
    model.expert_bank = ExpertBank(config)
    model.set_experts(BankProvider(model.expert_bank))
    if dense:
        set_dense(model, True)
    return model


def set_dense(model: Thinker, dense: bool) -> None:
    """Swap every layer between DenseExperts (training) and q3lab's sparse Experts (the reference)."""
    for i, layer in enumerate(model.model.layers):
        if dense:
            layer.mlp.experts = DenseExperts(model.config, i, model.expert_bank, layer.mlp.gate)
        else:
            layer.mlp.experts = Experts(model.config, i)
    model.set_experts(BankProvider(model.expert_bank))


def init_weights(model: Thinker, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2L), norms 1."""
    torch.manual_seed(seed)
    L = model.config.num_hidden_layers
    out_std = 0.02 / math.sqrt(2 * L)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("o_proj.weight") or name == "expert_bank.down":
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, 0.02)


@torch.no_grad()
def check_dense_matches_sparse(model: Thinker, device, *, tol: float = 1e-4) -> float:
    """Logits of the dense training path and of q3lab's sparse Experts on the same tokens (fp32, no TF32)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g).to(device)
    was_training = model.training
    model.eval()
    dense = model(ids)
    set_dense(model, False)
    sparse = model(ids)
    set_dense(model, True)
    model.train(was_training)
    err = (dense - sparse).abs().max().item() / max(sparse.abs().max().item(), 1e-12)
    if not err < tol:
        raise CheckpointError(f"train_mini: dense-equivalent experts differ from q3lab's sparse Experts: "
                              f"max relative logit difference {err:.3g}, expected < {tol}")
    return err


# -- data --------------------------------------------------------------------------------------------
def load_streams(corpus: Path, split: str) -> dict[str, np.ndarray]:
    out = {}
    for d in DOMAINS:
        path = corpus / f"{split}_{d}.npy"
        if not path.exists():
            raise InputError(f"train_mini: {path} not found: run scripts/build_corpus.py first")
        out[d] = np.load(path).astype(np.int64)
    return out


class Batcher:
    """Random windows of seq+1 tokens, a fixed number of rows per domain in every batch."""

    def __init__(self, streams: dict[str, np.ndarray], batch: int, seq: int, seed: int, device,
                 weights: dict[str, float] = DOMAIN_WEIGHTS):
        self.streams = {d: torch.from_numpy(s) for d, s in streams.items()}
        self.seq, self.device = seq, device
        self.gen = torch.Generator().manual_seed(seed)
        counts = {d: int(round(batch * weights[d] / sum(weights.values()))) for d in DOMAINS}
        counts["code"] += batch - sum(counts.values())
        self.counts = counts

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        ar = torch.arange(self.seq + 1)
        for d in DOMAINS:
            s = self.streams[d]
            starts = torch.randint(0, len(s) - self.seq - 1, (self.counts[d],), generator=self.gen)
            rows.append(s[starts[:, None] + ar])
        xy = torch.cat(rows).to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def parse_weights(spec: str) -> dict[str, float]:
    """'code=0.4,license=0.1,...' -> {domain: weight}; every domain must be named."""
    try:
        w = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise InputError(f"--domain-weights: expected 'domain=weight,...', got {spec!r}") from None
    if set(w) != set(DOMAINS) or min(w.values()) < 0 or sum(w.values()) <= 0:
        raise InputError(f"--domain-weights: expected non-negative weights for exactly {DOMAINS}, got {w}")
    return w


def val_windows(streams: dict[str, np.ndarray], seq: int, per_domain: int) -> dict[str, torch.Tensor]:
    """The first `per_domain` non-overlapping windows of seq+1 tokens of each validation stream."""
    out = {}
    for d, s in streams.items():
        n = min(per_domain, len(s) // (seq + 1))
        if n == 0:
            raise InputError(f"train_mini: validation stream {d} has {len(s)} tokens, fewer than one window")
        out[d] = torch.from_numpy(s[: n * (seq + 1)].reshape(n, seq + 1))
    return out


@torch.no_grad()
def eval_loss(model: Thinker, windows: dict[str, torch.Tensor], device, batch: int = 16) -> dict[str, float]:
    """Mean next-token cross-entropy per domain, and `mean` over the domains."""
    out = {}
    for d, w in windows.items():
        total, count = 0.0, 0
        for i in range(0, len(w), batch):
            xy = w[i:i + batch].to(device)
            logits = model(xy[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), xy[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += xy[:, 1:].numel()
        out[d] = total / count
    out["mean"] = sum(out[d] for d in windows) / len(windows)
    return out


def read_facts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def fact_ranks(model: Thinker, tok, facts: list[dict], device, batch: int = 128) -> list[int]:
    """Rank (1 = top) of each fact's expected first answer token after its prompt."""
    ranks = []
    pad = tok.token_to_id("<|endoftext|>")
    for i in range(0, len(facts), batch):
        chunk = facts[i:i + batch]
        enc = [tok.encode(f["prompt"]) for f in chunk]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, :len(e)] = torch.tensor(e)     # right padding: causal attention never sees it
        logits = model(ids.to(device))
        last = logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])]      # [B, V]
        for r, f in enumerate(chunk):
            exp = tok.encode(f["expected"])
            if len(exp) != 1:
                raise InputError(f"expected {f['expected']!r} of prompt {f['prompt']!r} is not one token")
            ranks.append(int((last[r] > last[r, exp[0]]).sum().item()) + 1)
    return ranks


def accuracy_by_relation(facts: list[dict], ranks: list[int]) -> dict[str, float]:
    out: dict[str, list[int]] = {}
    for f, r in zip(facts, ranks):
        out.setdefault(f["relation"], []).append(r == 1)
        out.setdefault("all", []).append(r == 1)
    return {k: sum(v) / len(v) for k, v in out.items()}


# -- the official layout --------------------------------------------------------------------------------
def canonical_state(model: Thinker, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every canonical tensor (docs/DESIGN.md) of the trained model, experts split per expert, on the CPU."""
    cfg = model.config
    params = {n: p for n, p in model.named_parameters() if not n.startswith("expert_bank.")}
    bank = model.expert_bank
    out = {}
    for name, shape in cfg.expected_tensors().items():
        if ".mlp.experts." in name:
            parts = name.split(".")
            layer, e, proj = int(parts[2]), int(parts[5]), parts[6]
            t = {"gate_proj": bank.gate, "up_proj": bank.up, "down_proj": bank.down}[proj][layer, e]
        else:
            if name not in params:
                raise CheckpointError(f"train_mini: model has no parameter {name}")
            t = params[name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"train_mini: {name} has shape {list(t.shape)}, expected {list(shape)}")
        out[name] = t.detach().to("cpu", dtype).contiguous()
    extra = set(params) - set(out)
    if extra:
        raise CheckpointError(f"train_mini: parameters not in the canonical layout: {sorted(extra)[:5]}")
    return out


def official_config(cfg: ThinkerConfig, tok_ids: dict[str, int]) -> dict:
    """The nested Qwen3-Omni config.json that `q3lab synth` writes (tiny audio/vision/talker configs), with
    audio output off: only the thinker text weights ship."""
    from q3lab.weights.synthetic import omni_config

    top = omni_config(cfg, "bf16", specials=tok_ids)
    top["enable_audio_output"] = False
    top["q3lab_note"] = ("mini model trained by scripts/train_mini.py: thinker text weights only (no audio tower, "
                         "vision tower, talker or code2wav tensors)")
    return top


def write_official(state: dict[str, torch.Tensor], cfg: ThinkerConfig, out: Path, tok_dir: Path,
                   n_shards: int = 2) -> list[str]:
    """config.json, model.safetensors.index.json and `n_shards` shards of `thinker.`-prefixed keys, cut by bytes
    so that a layer straddles each boundary (as in the real checkpoint), plus the tokenizer files."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    cuts, acc, target = [], 0, total / n_shards
    for i, s in enumerate(sizes):
        acc += s
        if len(cuts) < n_shards - 1 and acc >= target * (len(cuts) + 1):
            cuts.append(i + 1)
    bounds = [0, *cuts, len(names)]
    files = []
    weight_map = {}
    for k in range(n_shards):
        chunk = names[bounds[k]:bounds[k + 1]]
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({"thinker." + n: state[n] for n in chunk}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({"thinker." + n: fname for n in chunk})
        files.append(fname)
    for c in cuts:
        before, after = names[c - 1].split(".")[:3], names[c].split(".")[:3]
        if before != after:
            raise CheckpointError(f"train_mini: shard boundary between {names[c - 1]} and {names[c]} does not "
                                  f"split a layer")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in tok_cfg["added_tokens_decoder"].items()}
    (out / "config.json").write_text(json.dumps(official_config(cfg, ids), indent=2) + "\n")
    gen = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, out / f)
    return files


# -- training ------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train(args, config: dict = MINI, hooks=None) -> int:
    """Train the model of `config` (MINI unless a preset passes another), write the official layout to --out.

    `hooks`, if given, has `on_step(step, total_steps, model)` (called before the first step and after every
    step; total_steps is None until the schedule is planned), `on_final(model, log)` (after the bf16 rounding) and
    `on_write(out, log)` (after the checkpoint is written, before --tar-small packs): scripts/train_mini128.py
    records its router probes through them.
    """
    t_start = time.time()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = Path(args.corpus)
    from q3lab.base.tokenizer import load_tokenizer
    tok = load_tokenizer(corpus / "tokenizer")
    cfg = ThinkerConfig(**{**config, "num_hidden_layers": args.layers})
    if tok.vocab_size > cfg.vocab_size:
        raise InputError(f"tokenizer has {tok.vocab_size} ids, the config {cfg.vocab_size} embedding rows")
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    init_weights(model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    check_err = check_dense_matches_sparse(model, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}; {n_params:,} parameters; dense vs sparse experts: {check_err:.2e}", flush=True)

    train_streams = load_streams(corpus, "train")
    windows = val_windows(load_streams(corpus, "val"), args.seq, args.val_windows)
    facts = read_facts(Path(args.facts))
    batcher = Batcher(train_streams, args.batch, args.seq, args.seed, device, parse_weights(args.domain_weights))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=device.type == "cuda")
    amp = device.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
    deadline = t_start + 60 * args.minutes
    total_steps = args.steps
    log: dict = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "config": config | {"num_hidden_layers": args.layers}, "parameters": n_params,
                 "device": str(device), "gpu": torch.cuda.get_device_name(device) if amp else None,
                 "torch": torch.__version__, "dense_vs_sparse_rel_err": check_err, "domain_rows": batcher.counts,
                 "curve": [], "evals": []}

    def evaluate_now(step: int) -> dict:
        model.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            losses = eval_loss(model, windows, device)
            acc = accuracy_by_relation(facts, fact_ranks(model, tok, facts, device))
        model.train()
        row = {"step": step, "elapsed_s": round(time.time() - t_start, 1), "val": losses, "facts_top1": acc}
        log["evals"].append(row)
        print(f"eval step {step}: val {' '.join(f'{k} {v:.3f}' for k, v in losses.items())}; facts top-1 "
              f"{' '.join(f'{k} {v:.3f}' for k, v in acc.items())}", flush=True)
        return row

    if args.steps is None and args.plan_after <= 10:
        raise InputError(f"--plan-after must be > 10 (steps 10..plan-after are timed), got {args.plan_after}")
    model.train()
    step, t_loop, t_mark = 0, time.time(), time.time()
    if hooks is not None:
        hooks.on_step(0, total_steps, model)
    stopped = "steps"
    while total_steps is None or step < total_steps:
        if time.time() > deadline:
            stopped = "deadline"
            break
        lr = lr_at(step, total_steps or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batcher.next()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        aux = torch.stack([layer.mlp.experts.aux for layer in model.model.layers]).mean()
        (loss + args.aux_coef * aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == args.plan_after:
            lv, av = loss.item(), aux.item()
            rate = step * args.batch * args.seq / (time.time() - t_loop)
            log["curve"].append({"step": step, "lr": lr, "loss": lv, "aux": av, "grad_norm": gnorm.item(),
                                 "elapsed_s": round(time.time() - t_start, 1)})
            print(f"step {step:5d}  loss {lv:.4f}  aux {av:.4f}  lr {lr:.2e}  |g| {gnorm.item():.2f}  "
                  f"{rate / 1e3:.0f}k tok/s  {time.time() - t_start:.0f}s", flush=True)
        if step == 10:
            t_mark = time.time()   # time steps after the first few (CUDA and allocator warm-up)
        if total_steps is None and step == args.plan_after:
            # Plan the cosine schedule to end at the deadline, from the measured step time.
            per_step = (time.time() - t_mark) / (step - 10)
            total_steps = step + int((deadline - time.time()) / per_step * (1 - args.eval_reserve))
            log["planned_steps"] = total_steps
            print(f"planned {total_steps} steps ({per_step * 1e3:.1f} ms/step)", flush=True)
        if step % args.eval_every == 0:
            evaluate_now(step)
        if hooks is not None:
            hooks.on_step(step, total_steps, model)
    log.update(steps=step, stopped_by=stopped, train_tokens=step * args.batch * args.seq,
               train_seconds=round(time.time() - t_loop, 1))
    print(f"stopped after {step} steps ({stopped}), {time.time() - t_start:.0f}s", flush=True)

    # The shipped weights are bf16: evaluate exactly those, in fp32 without TF32, for the CPU check to match.
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    final = {"step": step, "val_fp32_bf16_weights": eval_loss(model, windows, device),
             "facts_top1": accuracy_by_relation(facts, fact_ranks(model, tok, facts, device))}
    log["final"] = final
    print(f"final (bf16 weights, fp32 math): {json.dumps(final)}", flush=True)
    if hooks is not None:
        hooks.on_final(model, log)

    out = Path(args.out)
    files = write_official(canonical_state(model), cfg, out, corpus / "tokenizer", n_shards=args.shards)
    if hooks is not None:
        hooks.on_write(out, log)
    log["total_seconds"] = round(time.time() - t_start, 1)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if args.tar_small:
        # The device tool returns at most 8 files: pack everything but the shards into one tar.
        small = [p for p in sorted(out.iterdir()) if p.name not in files]
        with tarfile.open(out / "small.tar", "w") as tf:
            for p in small:
                tf.add(p, arcname=p.name)
        for p in small:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}", flush=True)
    return 0


# -- evaluation on the CPU, through q3lab.load ----------------------------------------------------------
def routing_by_domain(model: Thinker, windows: dict[str, torch.Tensor], n: int) -> dict:
    """Chosen experts per (domain, layer, expert) on the first n validation windows of each domain."""
    cfg = model.config
    counts = torch.zeros(len(windows), cfg.num_hidden_layers, cfg.num_experts)
    current = {}

    def hook(layer):
        def fn(module, inp, out):
            counts[current["d"], layer] += torch.bincount(out.reshape(-1), minlength=cfg.num_experts).float()
        return fn

    handles = [layer.mlp.hook_topk_ids.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for di, (d, w) in enumerate(windows.items()):
                current["d"] = di
                model(w[:n, :-1])
    finally:
        for h in handles:
            h.remove()
    share = counts / counts.sum(-1, keepdim=True)                                   # [domains, L, E]
    load = counts.sum(0)                                                             # [L, E]
    purity = (counts.max(0).values.sum(-1) / counts.sum((0, 2)))                     # [L]: top-domain share
    sorted_load = load.sort(-1, descending=True).values
    cum = sorted_load.cumsum(-1) / sorted_load.sum(-1, keepdim=True)
    e90 = (cum < 0.9).sum(-1) + 1                                                    # experts carrying 90%
    # mean total-variation distance between the domains' expert distributions, per layer
    D = share.shape[0]
    tv = torch.stack([0.5 * (share[a] - share[b]).abs().sum(-1) for a in range(D) for b in range(a + 1, D)]).mean(0)
    return {"domain_purity_mean": purity.mean().item(), "domain_purity_chance": 1 / D,
            "experts_for_90pct_load_mean": e90.float().mean().item(),
            "domain_tv_distance_mean": tv.mean().item(),
            "domain_tv_distance_by_layer": [round(v, 3) for v in tv.tolist()]}


def evaluate(args) -> int:
    import q3lab
    from q3lab.base.tokenizer import load_tokenizer

    t0 = time.time()
    torch.manual_seed(0)
    path = Path(args.checkpoint)
    model = q3lab.load(path)
    tok = load_tokenizer(path)
    log_path = path / "train_log.json"
    trained = json.loads(log_path.read_text()) if log_path.exists() else None
    seq = trained["args"]["seq"] if trained else args.seq
    nwin = trained["args"]["val_windows"] if trained else args.val_windows
    windows = val_windows(load_streams(Path(args.corpus), "val"), seq, nwin)
    facts = read_facts(Path(args.facts))
    ranks = fact_ranks(model, tok, facts, "cpu")
    acc = accuracy_by_relation(facts, ranks)
    by_template = {}
    for f, r in zip(facts, ranks):
        key = f"{f['relation']}/{'one-token' if f['answer_tokens'] == 1 else 'multi-token'} answer"
        by_template.setdefault(key, []).append(r == 1)
    misses = [{"prompt": f["prompt"], "expected": f["expected"], "rank": r} for f, r in zip(facts, ranks) if r != 1]
    if args.facts_far:
        far = read_facts(Path(args.facts_far))
        result_far = accuracy_by_relation(far, fact_ranks(model, tok, far, "cpu"))
    losses = eval_loss(model, windows, "cpu")
    result = {"checkpoint": str(path), "val_loss_q3lab_cpu": losses, "facts_top1": acc,
              "facts_top1_by_kind": {k: sum(v) / len(v) for k, v in by_template.items()},
              "facts_misses": misses, "facts_n": len(facts)}
    if args.facts_far:
        result["facts_far_top1"] = result_far
    if trained:
        ref = trained["final"]["val_fp32_bf16_weights"]
        result["val_loss_train_script"] = ref
        result["val_loss_abs_diff_max"] = max(abs(ref[k] - losses[k]) for k in losses)
    result["routing"] = routing_by_domain(model, windows, 4)
    samples = {}
    for prompt in args.sample:
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, args.sample_tokens)
        samples[prompt] = tok.decode(out[0, ids.shape[1]:].tolist())
    result["samples_greedy"] = samples
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


SAMPLE_PROMPTS = ["The capital of France is", "Japan is located in", "The language spoken in Brazil is",
                  "Q: What is the capital of Kenya?\nA:", "17 + 25 =", "def read_lines(path):\n",
                  "import os\nimport sys\n\n", "This program is free software;", "Permission is hereby granted"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def build_parser(description: str = __doc__.splitlines()[0], *, train_func=None, evaluate_func=None,
                 train_defaults: dict | None = None, train_extra=None) -> argparse.ArgumentParser:
    """The `train` / `evaluate` command line; scripts/train_mini128.py reuses it with its own functions and
    defaults."""
    ap = argparse.ArgumentParser(description=description)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on a GPU (or a tiny smoke run on the CPU) and write the checkpoint")
    t.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    t.add_argument("--facts", default=str(ROOT / "data" / "prompts" / "facts.jsonl"))
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="auto")
    t.add_argument("--layers", type=int, default=MINI["num_hidden_layers"], help="fewer only for smoke tests")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=150)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--domain-weights", default=",".join(f"{d}={w}" for d, w in DOMAIN_WEIGHTS.items()),
                   help="share of each domain in every batch")
    t.add_argument("--aux-coef", type=float, default=0.01, help="Switch load-balancing loss weight")
    t.add_argument("--steps", type=int, default=None,
                   help="cosine schedule length; default: planned from the step time to end at --minutes")
    t.add_argument("--minutes", type=float, default=7.0, help="wall-clock limit; training stops and still saves")
    t.add_argument("--plan-after", type=int, default=40,
                   help="plan the schedule after this many steps (> 10: steps 10..plan-after are timed)")
    t.add_argument("--eval-reserve", type=float, default=0.04, help="fraction of the time left kept for evals")
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--val-windows", type=int, default=16, help="validation windows per domain")
    t.add_argument("--tar-small", action="store_true", help="pack all but the shards into small.tar")
    t.add_argument("--shards", type=int, default=2, help="safetensors shards (a layer straddles each boundary)")
    if train_extra is not None:
        train_extra(t)                    # more `train` options (a preset's own)
    t.set_defaults(func=train_func or train, **(train_defaults or {}))
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on the CPU through q3lab.load")
    e.add_argument("checkpoint")
    e.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    e.add_argument("--facts", default=str(ROOT / "data" / "prompts" / "facts.jsonl"))
    e.add_argument("--facts-far", default=str(ROOT / "data" / "prompts" / "facts_far.jsonl"),
                   help="harder held-out probes, reported separately ('' to skip)")
    e.add_argument("--seq", type=int, default=512)
    e.add_argument("--val-windows", type=int, default=16)
    e.add_argument("--sample", nargs="*", default=SAMPLE_PROMPTS)
    e.add_argument("--sample-tokens", type=int, default=24)
    e.add_argument("--json")
    e.set_defaults(func=evaluate_func or evaluate)
    return ap


if __name__ == "__main__":
    sys.exit(main())
