"""
rl.py: PAG-RL, a hand-written GRPO loop for multi-turn function calling with progress awareness.

    python rl.py                                               # CPU, 1 process, from out/sft/
    torchrun --standalone --nproc_per_node=2 rl.py             # CPU, 2 processes (gloo), same results
    torchrun --standalone --nproc_per_node=8 rl.py --init-from out/sft-smollm2 --device-batch-size 16

Which GRPO this is. Each step takes `prompts_per_step` tasks and plays `group_size` episodes of each with
the batched KV-cache sampler (model.rollout) against tools.Episode: user turns and tool results are
injected, never trained on. An episode's reward is tools' composite reward (format, turn pass rate,
task success, efficiency, awareness). Advantages are group-relative:
  grpo     (r - mean) / std within the group;
  dr_grpo  r - mean, and the loss is normalised by a constant (episodes x max_new_tokens), not by the
           number of tokens, which removes GRPO's length bias (Dr. GRPO);
  mt_grpo  turn-level credit (MT-GRPO): outcome rewards and per-turn pass rewards are normalised
           separately in the group; a turn's tokens get outcome advantage + turn_coef x turn advantage.
The loss is PPO's clipped surrogate with separate low/high clip ranges (DAPO's clip-higher), summed over
every sampled token of the step and divided once by the step's token count (DAPO's token-level
normalisation: the gradient does not depend on device_batch_size or the number of ranks; sequences of
tied groups, whose advantage is 0, skip their passes at --kl-coef 0). The old
log-probs are the sampler's (tests prove they equal the trainer's). Kept optional: a k3 KL penalty to
the frozen initial model (--kl-coef, default 0 as in DAPO; no reference model is loaded at 0), dynamic
sampling (drop groups whose rewards are all equal and sample more tasks), positive-only advantages
(--positive-only: below-mean episodes get 0, not a push down), PPO epochs. Dropped: a value
network (GRPO's point), and entropy bonuses. Episodes cut by a budget (context or message length) are
masked out of the loss or get a soft penalty (--overlong). In summary context mode every user turn is
its own context and so its own training sequence, carrying the episode's advantage (as in SUPO).
"""
import argparse
import json
import math
import os
import random
import resource
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
import tools

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# data
parser.add_argument("--tasks", default="data/rl.jsonl", help="RL task file (gen_data.py output)")
parser.add_argument("--eval-tasks", default="data/val.jsonl", help="held-out tasks for the periodic greedy eval")
# model
parser.add_argument("--init-from", default="out/sft", help="checkpoint to start from (HF dir, hub id or .gguf)")
parser.add_argument("--out-dir", default="out/rl", help="where checkpoints, logs and samples go")
# rollout
parser.add_argument("--prompts-per-step", type=int, default=8, help="tasks per step, over all ranks")
parser.add_argument("--group-size", type=int, default=8, help="episodes per task (G)")
parser.add_argument("--context-mode", choices=["full", "summary"], default="full", help="full history, or reset to the last summary at each user turn")
parser.add_argument("--pa", choices=["on", "off"], default="on", help="progress awareness (off = the MT-GRPO baseline)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
parser.add_argument("--engine", choices=["auto", "eager", "static"], default="auto",
                    help="sampler engine (model.rollout): static = device-resident decode steps, CUDA graphs on CUDA; "
                         "eager = one host-driven step at a time, the CPU's fastest; auto = static on CUDA, else eager")
parser.add_argument("--compile-sampler", action="store_true",
                    help="static engine on CUDA: torch.compile the decode step before capturing it (fuses its pointwise work)")
parser.add_argument("--sync-every", type=int, default=8, help="static engine: decode steps between host checks (steps)")
parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
parser.add_argument("--max-new-tokens", type=int, default=160, help="tokens per assistant message")
parser.add_argument("--max-len", type=int, default=1536, help="tokens per context (the KV cache length)")
parser.add_argument("--max-steps-per-turn", type=int, default=6, help="assistant messages per user turn before a force-quit")
parser.add_argument("--max-calls", type=int, default=32, help="tool calls per episode before a force-quit")
# reward and advantage
parser.add_argument("--w-format", type=float, default=0.1, help="reward weight: well-formed messages")
parser.add_argument("--w-turns", type=float, default=0.5, help="reward weight: fraction of turns passed")
parser.add_argument("--w-success", type=float, default=1.0, help="reward weight: task success")
parser.add_argument("--w-efficiency", type=float, default=0.1, help="reward weight: no extra or repeated calls")
parser.add_argument("--w-awareness", type=float, default=0.1, help="reward weight: summary/plan quality")
parser.add_argument("--overlong", choices=["mask", "penalty"], default="mask", help="episodes cut by a budget: drop from the loss, or subtract --overlong-penalty")
parser.add_argument("--overlong-penalty", type=float, default=0.5, help="reward subtracted from a cut episode (with --overlong penalty)")
parser.add_argument("--adv", choices=["grpo", "dr_grpo", "mt_grpo"], default="grpo", help="advantage estimator")
parser.add_argument("--positive-only", action="store_true", help="clip advantages below 0 to 0: learn only from the "
                    "better episodes of each group, push nothing down (RAFT++-like; mt_grpo's turn term is kept as is)")
parser.add_argument("--turn-coef", type=float, default=0.5, help="mt_grpo: weight of the turn-level advantage")
parser.add_argument("--dynamic-sampling", action="store_true", help="drop zero-variance groups and sample more tasks (DAPO)")
parser.add_argument("--max-resample", type=int, default=2, help="extra sampling rounds per step with --dynamic-sampling")
# optimisation
parser.add_argument("--num-steps", type=int, default=10, help="optimizer steps (one rollout batch each)")
parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
parser.add_argument("--warmup-steps", type=int, default=2, help="linear warm-up steps")
parser.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr x this")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
parser.add_argument("--ppo-epochs", type=int, default=1, help="passes (optimizer steps) over each rollout batch")
parser.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1")
parser.add_argument("--clip-high", type=float, default=0.28, help="ratio clip above 1")
parser.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL penalty to the initial model (0 = no reference model)")
parser.add_argument("--device-batch-size", type=int, default=16, help="sequences per forward/backward pass")
# eval / checkpoint
parser.add_argument("--eval-every", type=int, default=10, help="steps between greedy evals, and at the start and the end (0 = never)")
parser.add_argument("--eval-size", type=int, default=16, help="held-out tasks per eval")
parser.add_argument("--sample-every", type=int, default=10, help="steps between transcript dumps to samples.jsonl")
parser.add_argument("--save-every", type=int, default=5, help="steps between checkpoints (and at the end)")
parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
parser.add_argument("--time-limit", type=float, default=0, help="evaluate, save and exit at the first step after this "
                    "many seconds of wall time (0 = no limit); the lr schedule still assumes --num-steps, so --resume goes on")
# runtime
parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
parser.add_argument("--seed", type=int, default=0, help="seed of task order and sampling")
parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")


def make_episode(task, args):
    return tools.Episode(task, context_mode=args.context_mode, pa=args.pa == "on",
                         max_steps_per_turn=args.max_steps_per_turn, max_calls=args.max_calls)


def group_advantages(rewards, normalise, positive_only=False):
    """rewards (n_groups, G) -> advantages: r - group mean, / group std if normalise, negatives set to 0
    if positive_only. Groups whose rewards are all equal get exactly 0 (no signal; no 0/0)."""
    adv = rewards - rewards.mean(1, keepdim=True)
    if normalise:
        adv = adv / (rewards.std(1, keepdim=True) + 1e-6)
    flat = (rewards.max(1, keepdim=True).values - rewards.min(1, keepdim=True).values) == 0
    adv = adv.masked_fill(flat, 0.0)
    return adv.clamp(min=0.0) if positive_only else adv


def shaping_only(rewards, parts):
    """rewards (n_groups, G), parts one dict per episode -> per group: True if its rewards differ but every
    episode has the same task success and turn pass rate, so its advantages come only from the shaping terms
    (format, efficiency, awareness). GRPO's std division scales them to order 1 however small the gap, so
    there a shaping term steers as hard as success would."""
    G = rewards.shape[1]
    return [bool(r.max() > r.min()) and len({(q["success"], q["turns"]) for q in parts[g * G:(g + 1) * G]}) == 1
            for g, r in enumerate(rewards)]


def success_split(parts, group_size):
    """parts one dict per episode -> per group: True if its episodes differ in task success, the groups where
    success itself steers the update. At a rollout success rate p and G episodes per task its expected share
    is at most 1 - p**G - (1 - p)**G (0.48 at p = 0.15, G = 4; 0.73 at G = 8), less where some tasks are easy
    and some out of reach: the case for a larger G."""
    return [len({q["success"] for q in parts[g:g + group_size]}) > 1 for g in range(0, len(parts), group_size)]


def turn_advantages(turn_rewards, group_size):
    """MT-GRPO's turn level: turn_rewards, a list (one per episode) of per-turn rewards; episodes of a group
    are normalised turn index by turn index among those that reached it. -> list of per-turn advantages."""
    out = []
    for g in range(0, len(turn_rewards), group_size):
        grp = turn_rewards[g:g + group_size]
        adv = [[0.0] * len(t) for t in grp]
        for k in range(max(map(len, grp))):
            have = [j for j, t in enumerate(grp) if len(t) > k]
            r = torch.tensor([grp[j][k] for j in have], dtype=torch.float64)
            if len(have) > 1 and r.max() > r.min():
                a = (r - r.mean()) / (r.std() + 1e-6)
                for j, v in zip(have, a.tolist()):
                    adv[j][k] = v
        out += adv
    return out


def episode_rewards(results, args):
    """(rewards (n,), parts list, per-turn rewards list) for finished rollout rows."""
    weights = {"format": args.w_format, "turns": args.w_turns, "success": args.w_success,
               "efficiency": args.w_efficiency, "awareness": args.w_awareness}
    rewards, parts, turns = [], [], []
    for res in results:
        ep = res["episode"]
        p = ep.reward_parts()
        r = tools.total_reward(p, weights)
        if res["truncated"] and args.overlong == "penalty":
            r -= args.overlong_penalty
        rewards.append(r)
        parts.append(p)
        turns.append([float(bool(t["passed"])) for t in ep.turns])
    return torch.tensor(rewards, dtype=torch.float64), parts, turns


def build_sequences(results, adv, tok_adv_turn, args):
    """
    Training sequences from rollout rows: one per context segment. Each gets its ids, the sampler's mask
    and log-probs, and a per-token advantage. Sampled tokens come in runs, one run per assistant message,
    and message i belongs to user turn episode.turn_index[i] (used by mt_grpo).
    """
    seqs = []
    for i, res in enumerate(results):
        drop = res["truncated"] and args.overlong == "mask"
        turn_of = res["episode"].turn_index
        msg = -1
        for seg in res["segments"]:
            a = [0.0] * len(seg["ids"])
            prev = 0
            for t, m in enumerate(seg["mask"]):
                if m and not prev:
                    msg += 1
                if m:
                    k = turn_of[min(msg, len(turn_of) - 1)] if turn_of else 0
                    turn_adv = tok_adv_turn[i][k] if tok_adv_turn is not None and k < len(tok_adv_turn[i]) else 0.0
                    a[t] = float(adv[i]) + args.turn_coef * turn_adv
                prev = m
            mask = [0] * len(seg["mask"]) if drop else seg["mask"]
            if sum(mask):
                seqs.append({"ids": seg["ids"], "mask": mask, "logp": seg["logp"], "adv": a})
    return seqs


def with_signal(seqs):
    """The sequences with a nonzero advantage on some sampled token. Without a KL term the others (every sequence of a
    tied group) have a zero loss and a zero gradient, so training skips their forward and backward passes; the step's
    normaliser still counts their tokens, so the update is the same."""
    return [s for s in seqs if any(a != 0 for a, m in zip(s["adv"], s["mask"]) if m)]


def collate(seqs, pad_id, device):
    """Right-pad to the longest sequence; pads are masked out (and pad is never the end-of-message id)."""
    T = max(len(s["ids"]) for s in seqs)
    out = {k: torch.full((len(seqs), T), pad_id if k == "ids" else 0, dtype=torch.long if k in ("ids", "mask") else torch.float32)
           for k in ("ids", "mask", "logp", "adv")}
    for i, s in enumerate(seqs):
        for k in out:
            out[k][i, :len(s[k])] = torch.tensor(s[k], dtype=out[k].dtype)
    return {k: v.to(device) for k, v in out.items()}


def policy_loss(model, batch, norm, args, ref_model=None):
    """Clipped-surrogate loss of one micro-batch, summed over its sampled tokens and divided by `norm`
    (the whole step's normaliser, so micro-batching does not change the gradient). -> (loss, stats)."""
    ids, keep = batch["ids"], batch["mask"][:, 1:] == 1   # keep: the positions that predict a sampled token
    logits = model(ids[:, :-1], logits_at=keep)                                   # (n, V): no logits elsewhere
    lp = torch.log_softmax(logits.float() / args.temperature, -1)                 # once: for logp and entropy
    tgt = ids[:, 1:][keep]
    logp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)                           # (n,)
    old, adv = batch["logp"][:, 1:][keep], batch["adv"][:, 1:][keep]
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1 - args.clip_low, 1 + args.clip_high)
    per_tok = -torch.minimum(ratio * adv, clipped * adv)
    stats = {}
    if ref_model is not None:
        with torch.no_grad():
            ref = M.token_logprobs(ref_model(ids[:, :-1], logits_at=keep), tgt, args.temperature)
        log_r = ref - logp
        k3 = torch.exp(log_r) - log_r - 1   # unbiased, always >= 0 estimator of KL(pi || ref)
        per_tok = per_tok + args.kl_coef * k3
        stats["kl"] = k3.detach().sum()
    loss = per_tok.sum() / norm
    with torch.no_grad():
        lp = lp.detach()
        stats["entropy"] = -(lp.exp() * lp).sum()
        stats["clipfrac"] = ((ratio - clipped).abs() > 1e-6).float().sum()
        stats["kl_old"] = (old - logp.detach()).sum()   # drift from the sampling policy
        stats["tokens"] = torch.tensor(float(len(tgt)), device=ids.device)
    return loss, stats


def lr_at(step, args):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = (step - args.warmup_steps) / max(1, args.num_steps - args.warmup_steps)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def all_reduce(x, op=None):
    """Sum (or op) a CPU float tensor over ranks; identity in a single process. NCCL reduces CUDA tensors only."""
    if dist.is_initialized():
        y = x.cuda() if dist.get_backend() == "nccl" else x
        dist.all_reduce(y, op=op or dist.ReduceOp.SUM)
        return y.cpu()
    return x


def write_curve(log_path, svg_path):
    """Plot log.jsonl as an SVG (no plotting package needed): training reward and the share of rollout episodes
    that succeed per step, and the periodic greedy eval's task success and turn pass rate. Written atomically,
    after every step."""
    recs = [json.loads(line) for line in open(log_path)]
    series = {"reward (train)": ("#1f77b4", [(r["step"], r["reward"]) for r in recs if "reward" in r]),
              "task success (train rollouts)": ("#ff7f0e", [(r["step"], r["success"]) for r in recs if "success" in r]),
              "task success (eval)": ("#d62728", [(r["step"], r["eval_success"]) for r in recs if "eval_success" in r]),
              "turn pass rate (eval)": ("#2ca02c", [(r["step"], r["eval_turns"]) for r in recs if "eval_turns" in r])}
    W, H, L, B = 640, 360, 50, 40   # size and left/bottom margins
    xmax = max([1] + [x for _, pts in series.values() for x, _ in pts])
    ymax = max([0.05] + [y for _, pts in series.values() for _, y in pts]) * 1.1
    px = lambda x: L + (W - L - 20) * x / xmax
    py = lambda y: H - B - (H - B - 20) * y / ymax
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">RL step</text>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{L - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x in sorted({round(xmax * i / 4) for i in range(5)}):   # whole steps only
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 15}" text-anchor="middle">{x}</text>')
    drawn = [(name, color, pts) for name, (color, pts) in series.items() if pts]   # no eval series at --eval-every 0
    for k, (name, color, pts) in enumerate(drawn):
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        out.append(f'<text x="{L + 10}" y="{35 + 16 * k}" fill="{color}">{name}</text>')
    tmp = svg_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(out + ["</svg>"]) + "\n")
    os.replace(tmp, svg_path)


def main(args):
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = M.init_runtime(args.device, args.seed)
    master_process = ddp_rank == 0
    t_start = time.time()
    assert args.prompts_per_step % ddp_world_size == 0, "prompts_per_step must divide by the number of ranks"
    if args.temperature <= 0:
        raise SystemExit("--temperature must be > 0: GRPO needs different samples within a group")
    if args.context_mode == "summary" and args.pa == "off":
        raise SystemExit("--context-mode summary needs --pa on (the summary is what the context keeps)")
    M.print0(json.dumps(vars(args)))
    tasks, eval_tasks = tools.read_tasks(args.tasks), tools.read_tasks(args.eval_tasks)[:args.eval_size]
    ckpt = args.out_dir if args.resume else args.init_from
    if args.resume and not os.path.exists(os.path.join(args.out_dir, "trainer_state.pt")):
        raise SystemExit(f"--resume: no checkpoint in {args.out_dir}")
    raw_model, tok = M.load_model(ckpt, device)
    chat = M.Chat(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id not in chat.stop_ids and tok.pad_token_id is not None else 0
    ref_model = None
    if args.kl_coef > 0:  # the reference is the starting policy, frozen
        ref_model = M.load_model(args.init_from, device)[0].eval().requires_grad_(False)
    train_model = torch.compile(raw_model) if args.compile else raw_model
    model = DDP(train_model, device_ids=[ddp_local_rank] if device.startswith("cuda") else None) if ddp else train_model
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    start = 0
    if args.resume:
        state = torch.load(os.path.join(args.out_dir, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        M.print0(f"resumed from {args.out_dir} at step {start}")
    os.makedirs(args.out_dir, exist_ok=True)
    log_path, samples_path = os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "samples.jsonl")
    if master_process and not args.resume:
        for p in (log_path, samples_path):
            if os.path.exists(p):
                os.remove(p)
    sample_kw = dict(max_new_tokens=args.max_new_tokens, max_len=args.max_len, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, engine=args.engine, sync_every=args.sync_every,
                     compile_step=args.compile_sampler)
    local = args.prompts_per_step // ddp_world_size
    G = args.group_size

    bar = M.progress_bar(args.num_steps, "rl", initial=start)
    for step in range(start, args.num_steps + 1):
        # out of time (after at least one step): all ranks agree, so they evaluate, save and stop at the same step
        late = args.time_limit > 0 and step > start and all_reduce(torch.tensor([float(time.time() - t_start > args.time_limit)]))[0] > 0
        if late and step < args.num_steps:
            M.print0(f"--time-limit {args.time_limit:g} s reached: stopping at step {step} of {args.num_steps}")
        last = step == args.num_steps or late
        # ---- eval and checkpoint at the top of the step
        if args.eval_every and (step % args.eval_every == 0 or last):
            raw_model.eval()
            mine = eval_tasks[ddp_rank::ddp_world_size]
            with M.autocast(device):
                res = M.rollout(raw_model, chat, [make_episode(t, args) for t in mine], **{**sample_kw, "temperature": 0.0})
            s = all_reduce(torch.tensor([sum(r["episode"].success for r in res), len(res),
                                         sum(r["episode"].reward_parts()["turns"] for r in res)], dtype=torch.float64))
            M.print0(f"eval step {step}: task success {s[0] / s[1]:.3f}, turn pass rate {s[2] / s[1]:.3f} on {int(s[1])} held-out tasks")
            if master_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "eval_success": float(s[0] / s[1]), "eval_turns": float(s[2] / s[1])}) + "\n")
                write_curve(log_path, os.path.join(args.out_dir, "curve.svg"))
        if master_process and step > start and (step % args.save_every == 0 or last):
            M.save_model(raw_model, tok, args.out_dir, extra={"optimizer": optimizer.state_dict(), "step": step,
                                                              "args": vars(args)})
        if last:
            break

        # ---- rollouts: this rank's share of the step's tasks, G episodes each
        t0 = time.time()
        raw_model.eval()
        order = random.Random(args.seed + step // max(1, len(tasks) // args.prompts_per_step)).sample(range(len(tasks)), len(tasks))
        first = (step * args.prompts_per_step) % len(tasks)
        picks = [order[(first + ddp_rank + ddp_world_size * j) % len(tasks)] for j in range(local)]
        # one sampling key per episode, (step, global task slot, j): samples are the same under any number of
        # ranks and after a resume
        slots = [ddp_rank + ddp_world_size * j for j in range(local)]
        gens = [args.seed * 1_000_003 + step * 10_007 + s * 101 + j for s in slots for j in range(G)]
        extra = random.Random(args.seed * 7919 + step * 31 + ddp_rank)
        results, rewards, parts, turn_r, zero_var, groups_seen = [], [], [], [], 0, 0
        inject_s = 0.0   # rollout time in prefills and injections (the rest: decode steps and host work)
        for round_ in range(1 + (args.max_resample if args.dynamic_sampling else 0)):
            with M.autocast(device):   # the precision the trainer recomputes these log-probs in (bf16 on CUDA)
                inner = M.progress_bar(len(picks) * G, f"step {step} rollouts", leave=False)
                res = M.rollout(raw_model, chat, [make_episode(tasks[i], args) for i in picks for _ in range(G)],
                                seeds=gens[:len(picks) * G], progress=inner, **sample_kw)
                inner.close()
            inject_s += res[0]["timing"]["inject_s"] if res else 0.0
            r, p, tr = episode_rewards(res, args)
            flat = (r.view(-1, G).max(1).values == r.view(-1, G).min(1).values).tolist()
            zero_var += sum(flat)
            groups_seen += len(flat)
            for g, is_flat in enumerate(flat):
                keep = not (args.dynamic_sampling and is_flat) or round_ == args.max_resample
                if keep and len(results) < local * G:
                    sl = slice(g * G, (g + 1) * G)
                    results += res[sl]
                    rewards.append(r[sl])
                    parts += p[sl]
                    turn_r += tr[sl]
            if len(results) >= local * G:
                break
            picks = [extra.randrange(len(tasks)) for _ in range(local - len(results) // G)]
            gens = [extra.randrange(2**62) for _ in range(len(picks) * G)]
        rewards = torch.stack(rewards)                                            # (groups, G)
        adv = group_advantages(rewards, normalise=args.adv != "dr_grpo", positive_only=args.positive_only).flatten()
        tok_turn = turn_advantages(turn_r, G) if args.adv == "mt_grpo" else None
        seqs = build_sequences(results, adv, tok_turn, args)
        t_rollout = time.time() - t0

        # ---- train: token-level normalisation over the whole step, decided once here
        t1 = time.time()
        raw_model.train()
        n_tok = all_reduce(torch.tensor([float(sum(sum(s["mask"]) for s in seqs))]))[0]
        n_eps = all_reduce(torch.tensor([float(len(results))]))[0]
        norm = n_eps * args.max_new_tokens if args.adv == "dr_grpo" else n_tok
        norm = max(float(norm), 1.0) / ddp_world_size   # DDP averages gradients over ranks; undo that
        n_seqs = len(seqs)
        if args.kl_coef == 0:   # a sequence with no nonzero advantage adds exactly 0 to the loss: skip its passes
            seqs = with_signal(seqs)
        seqs.sort(key=lambda s: len(s["ids"]))          # similar lengths together: less padding
        micro = [seqs[i:i + args.device_batch_size] for i in range(0, len(seqs), args.device_batch_size)]
        n_micro = int(all_reduce(torch.tensor([float(len(micro))]), dist.ReduceOp.MAX if ddp else None)[0])
        lr = lr_at(step, args)
        for g_ in optimizer.param_groups:
            g_["lr"] = lr
        stats = {}
        dummy = {"ids": [pad_id, pad_id], "mask": [0, 0], "logp": [0.0, 0.0], "adv": [0.0, 0.0]}
        for epoch in range(args.ppo_epochs):
            for i in range(n_micro):
                # every rank runs the same number of passes; a rank short of data runs a zero-weight one
                mb = collate(micro[i] if i < len(micro) else [dummy], pad_id, device)
                if ddp:
                    model.require_backward_grad_sync = i == n_micro - 1   # sync only on the last micro-step
                with M.autocast(device):
                    loss, st = policy_loss(model, mb, norm, args, ref_model)
                loss.backward()
                if epoch == 0:
                    for k, v in st.items():
                        stats[k] = stats.get(k, 0.0) + float(v)
            gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            if gnorm > 0:   # every group tied: no signal, and AdamW's momentum alone would still move the weights
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t1

        # ---- log: scalars summed over ranks
        keys = ["format", "turns", "success", "efficiency", "awareness"]
        vec = torch.tensor([float(rewards.sum()), len(results)] + [sum(p[k] for p in parts) for k in keys] +
                           [sum(len(r["episode"].turns) for r in results), sum(r["episode"].num_calls for r in results),
                            sum(r["gen_tokens"] for r in results), sum(r["injected_tokens"] for r in results),
                            sum(r["truncated"] for r in results), zero_var, groups_seen,
                            sum(shaping_only(rewards, parts)), len(rewards)] +
                           [stats.get(k, 0.0) for k in ("entropy", "clipfrac", "kl_old", "kl", "tokens")] +
                           [sum(success_split(parts, G)), len(seqs), n_seqs], dtype=torch.float64)
        vec = all_reduce(vec)
        n = vec[1]
        rec = {"step": step, "reward": vec[0] / n, **{k: vec[2 + i] / n for i, k in enumerate(keys)},
               "turns_per_ep": vec[7] / n, "calls_per_ep": vec[8] / n, "gen_tokens": vec[9], "inj_tokens": vec[10],
               "truncated": vec[11] / n, "zero_var_frac": vec[12] / max(1, vec[13]),
               "shaping_frac": vec[14] / max(1, vec[15]), "success_frac": vec[21] / max(1, vec[15]),
               "trained_frac": vec[22] / max(1, vec[23]),   # sequences that ran forward/backward (with_signal)
               "entropy": vec[16] / max(1, vec[20]), "clipfrac": vec[17] / max(1, vec[20]),   # over trained tokens
               "kl_old": vec[18] / max(1, vec[20]), "kl": vec[19] / max(1, vec[20]), "lr": lr, "grad_norm": float(gnorm),
               "rollout_s": t_rollout, "inject_frac": inject_s / max(t_rollout, 1e-9), "train_s": t_train}
        rec = {k: (int(v) if k == "step" else float(v)) for k, v in rec.items()}
        M.log_step(bar, f"step {step:4d}/{args.num_steps} | reward {rec['reward']:.3f} (fmt {rec['format']:.2f} turns {rec['turns']:.2f} "
                 f"succ {rec['success']:.2f} eff {rec['efficiency']:.2f} aw {rec['awareness']:.2f}) | turns {rec['turns_per_ep']:.1f} "
                 f"calls {rec['calls_per_ep']:.1f} | gen {int(rec['gen_tokens'])} inj {int(rec['inj_tokens'])} tok | "
                 f"zero-var {rec['zero_var_frac']:.2f} shaping-only {rec['shaping_frac']:.2f} success-split {rec['success_frac']:.2f} trained {rec['trained_frac']:.2f} | kl {rec['kl']:.4f} ent {rec['entropy']:.2f} clip {rec['clipfrac']:.3f} | "
                 f"lr {lr:.2e} | rollout {t_rollout:.1f}s ({rec['inject_frac']:.0%} injecting) train {t_train:.1f}s",
                   reward=f"{rec['reward']:.3f}", success=f"{rec['success']:.2f}", rollout_s=f"{t_rollout:.0f}")
        if master_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            write_curve(log_path, os.path.join(args.out_dir, "curve.svg"))
            if args.sample_every and step % args.sample_every == 0:
                with open(samples_path, "a") as f:
                    for j in range(min(2, len(results))):
                        seg = results[j]["segments"][-1]
                        f.write(json.dumps({"step": step, "task": results[j]["episode"].task.get("id"),
                                            "reward": float(rewards.flatten()[j]), "advantage": float(adv[j]),
                                            "parts": parts[j], "messages": results[j]["episode"].messages,
                                            "truncated": results[j]["truncated"],
                                            "mask": seg["mask"], "ids": seg["ids"]}) + "\n")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    M.print0(f"peak memory: {peak:.2f} GiB ({'GPU' if device.startswith('cuda') else 'CPU RSS'})")
    M.cleanup_runtime()


if __name__ == "__main__":
    main(parser.parse_args())
