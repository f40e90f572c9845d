"""
gen_data.py: PAG, the Progress Awareness Generation pipeline of PARL-MT -> data/{train,val,test,rl}.jsonl.

    python gen_data.py                              # CPU default: 4,000 episodes (+ augmented copies) of the tiny world, ~16 s
    python gen_data.py --world full                 # all 7 domains (76 functions): the world of the pretrained-model runs
    python gen_data.py --num-episodes 10000         # the speed check (< 60 s on 2 CPU cores)
    python gen_data.py --pa none --out-dir data_nopa  # the no-awareness baseline data
    python gen_data.py --verify-with out/sft        # train only on the steps a model can take from their awareness
    python gen_data.py --source bfcl --out-dir data_bfcl  # BFCL multi-turn entries, split by entry id

Stages, one function each, in this order:
  1. tasks        bottom-up: atomic intents grounded in a live environment state, composed into turns
                  (sequential with data dependencies, parallel, 1-3 domains), turns into multi-turn episodes
                  whose later turns refer back to earlier results ("cancel that booking")
  2. language     several phrasings per intent, referring expressions, combined into one user message
  3. variants     miss_param, miss_func, long_context, error_recovery (as in BFCL)
  4. trajectories top-down: the ground truth runs through tools.Episode (real results, reference states)
  5. awareness    a <summary> (facts the remaining steps need) and a <plan> (remaining functions) before
                  every call; programmatic and exact by default, --teacher PATH rewrites the summaries
  6. verification --verify-with CKPT: per step, in the context SFT trains in (--verify-context-mode), the
                  model is given the step's own <summary>/<plan> and must write the reference calls, and the
                  summary must state only true things; a failed step stays as context without a loss
  7. augmentation paraphrase, schema perturbation (renamed parameters, reordered tools, short
                  descriptions), word masking; each with a rate flag; train only
  8. splits       train / val / test (held-out function combinations + a longer-horizon slice), dedupe,
                  an RL task file disjoint from train

One JSON object per line: the task (tools.Episode replays it) + "messages" and "tools" for SFT. Same seed ->
byte-identical files. Everything is written to temporary files first and renamed at the end.
"""
import argparse
import copy
import json
import os
import random
import re
import sys
import time
from collections import Counter

from tqdm import tqdm

import tools

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# data source and size
# --world's defaults for the flags below that default to None (check_args fills them in)
WORLD_PRESETS = {"tiny": {"domains": "files,messages", "prompt": "short", "distractor_tools": 0,
                          "held_out_pairs": "cat+send_message,grep+reply", "test_frac": 0.025, "test_long_frac": 0.015},
                 "full": {"domains": "all", "prompt": "full", "distractor_tools": 1,
                          "held_out_pairs": "book_flight+send_message,place_order+write,create_event+set_brightness",
                          "test_frac": 0.05, "test_long_frac": 0.03}}

parser.add_argument("--source", choices=["synthetic", "bfcl"], default="synthetic",
                    help="synthetic: our 7 environments; bfcl: BFCL v4 multi-turn entries (the installed bfcl-eval)")
parser.add_argument("--num-episodes", type=int, default=4000, help="synthetic SFT episodes in all (train + val + test)")
parser.add_argument("--val-frac", type=float, default=0.05, help="fraction of --num-episodes for val (same distribution as train)")
parser.add_argument("--test-frac", type=float, default=None, help="fraction of --num-episodes for test with held-out "
                    f"compositions. Default: --world's (tiny {WORLD_PRESETS['tiny']['test_frac']}, full {WORLD_PRESETS['full']['test_frac']})")
parser.add_argument("--test-long-frac", type=float, default=None, help="fraction of --num-episodes for the longer-horizon "
                    f"test slice. Default: --world's (tiny {WORLD_PRESETS['tiny']['test_long_frac']}, full {WORLD_PRESETS['full']['test_long_frac']})")
parser.add_argument("--num-rl", type=int, default=300, help="RL tasks (no trajectories), disjoint from train")
parser.add_argument("--max-turns", type=int, default=4, help="most user turns of a train/val/rl episode (turns)")
parser.add_argument("--long-turns", type=int, default=8, help="most user turns of a longer-horizon test episode (turns); "
                    "the fewest is --max-turns + 1")
parser.add_argument("--held-out-pairs", default=None,
                    help="function pairs never together in train/val/rl, only in test: 'f+g,h+k'. Default: --world's")
parser.add_argument("--turn-decay", type=float, default=0.7, help="P(n+1 turns) / P(n turns) within a split's turn range (ratio)")
parser.add_argument("--multi-intent", type=float, default=0.25, help="probability that a user turn asks for 2-3 things (fraction)")
parser.add_argument("--world", choices=["tiny", "full"], default="tiny",
                    help="fills in --domains, --prompt, --distractor-tools, --held-out-pairs and the test sizes. tiny = "
                         "files and messages (26 functions), no distractor tools, the short system prompt, held-out pairs "
                         "cat+send_message and grep+reply, a test file half the size (an eval of it fits the quick "
                         "start): what a 1M-parameter model from scratch learns on 2 CPU cores in minutes (README); full = all 7 domains (76 functions), 1 distractor tool, the full system "
                         "prompt: the world of the pretrained-model runs")
parser.add_argument("--domains", default=None,
                    help="the slice of the tool world episodes draw on (comma-separated domains, or 'all'); held-out pairs "
                         "outside it are dropped, and so are the variants it cannot make (error recovery: files, bank or "
                         "calendar). Default: --world's")
parser.add_argument("--prompt", choices=["full", "short"], default=None,
                    help="system prompt of the episodes (written into every task): full = the protocol spelt out, for "
                         "pretrained models; short = two lines, for a model from scratch, which learns the protocol from "
                         "the examples (227 fewer tokens per context). Default: --world's")
parser.add_argument("--distractor-tools", type=int, default=None,
                    help="functions offered beyond the ones the episode uses (count). Default: --world's")
parser.add_argument("--bfcl-categories", default="base,miss_func,miss_param,long_context", help="--source bfcl: categories")
parser.add_argument("--bfcl-limit", type=int, default=0, help="--source bfcl: entries per category (0 = all)")
parser.add_argument("--bfcl-test-frac", type=float, default=0.5, help="--source bfcl: fraction of entry ids held out for test")
# variants (fractions of episodes)
parser.add_argument("--miss-param-rate", type=float, default=0.1, help="episodes with a turn that omits a value (fraction)")
parser.add_argument("--miss-func-rate", type=float, default=0.08, help="episodes with a held-out function added later (fraction)")
parser.add_argument("--long-context-rate", type=float, default=0.06, help="episodes with large outputs and distractors (fraction)")
parser.add_argument("--error-recovery-rate", type=float, default=0.08, help="episodes with a failing call then a fix (fraction)")
parser.add_argument("--long-min-chars", type=int, default=1500, help="a turn with a tool result this long is long_context (characters)")
# progress awareness
parser.add_argument("--pa", choices=["programmatic", "none"], default="programmatic",
                    help="programmatic: exact <summary>/<plan> from the ground truth; none: no awareness (baseline)")
parser.add_argument("--teacher", default="", help="a local causal LM (model.py load_model path) that rewrites the summaries; '' = none")
parser.add_argument("--teacher-max-new-tokens", type=int, default=96, help="teacher: max tokens per rewritten summary")
# verification
parser.add_argument("--verify-with", default="", help="checkpoint (a short sft.py run on the unverified data) for model-aware "
                    "verification of every annotated train step; '' = off")
parser.add_argument("--verify-context-mode", choices=["full", "summary"], default="full",
                    help="verification: the context each step is shown in (that of the sft.py run the data is for)")
parser.add_argument("--verify-max-new-tokens", type=int, default=160, help="verification: max tokens per greedy prediction")
parser.add_argument("--verify-max-len", type=int, default=4096, help="verification: max tokens per context")
parser.add_argument("--batch-size", type=int, default=32, help="teacher/verification: contexts per batched rollout")
# augmentation (fractions of train episodes that get an augmented copy)
parser.add_argument("--paraphrase-rate", type=float, default=0.1, help="train episodes copied with paraphrased user turns (fraction)")
parser.add_argument("--schema-rate", type=float, default=0.05, help="train episodes copied with perturbed tool schemas (fraction)")
parser.add_argument("--mask-rate", type=float, default=0.05, help="train episodes copied with words dropped from user turns (fraction)")
parser.add_argument("--mask-words", type=float, default=0.15, help="word masking: fraction of plain words dropped per user turn")
# output / runtime
parser.add_argument("--out-dir", default="data", help="output directory (train/val/test/rl.jsonl, stats.json, dropped.jsonl)")
parser.add_argument("--stats-vocab-size", type=int, default=2048, help="stats: vocabulary of the byte-level BPE used to count tokens")
parser.add_argument("--stats-sample", type=int, default=200, help="stats: episodes per split used to train the BPE and count tokens")
parser.add_argument("--seed", type=int, default=0, help="random seed: same seed -> byte-identical files")
parser.add_argument("--device", default="cpu", help="teacher/verification device (cpu, cuda)")


# ----------------------------------------------------------------------------------------------
# Stage 1a: worlds. Small configs in the formats the tools.py env docstrings give; names are drawn from
# pools so that a model must copy values from the request or the results instead of memorising them.

FIRST = ["Ann", "Bo", "Carla", "Dev", "Eve", "Femi", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zane"]
LAST = ["Lee", "Chen", "Diaz", "Patel", "Martin", "Kim", "Novak", "Silva", "Okafor", "Berg", "Rossi", "Tanaka"]
WORDS = ["budget", "report", "notes", "draft", "invoice", "summary", "todo", "plan", "data", "memo", "recipe", "taxes"]
SUBJECTS = ["Budget", "Lunch", "Trip", "Invoice", "Party", "Meeting", "Review", "Tickets", "Garden", "Concert"]
TITLES = ["Standup", "Design review", "Dentist", "Gym", "Team lunch", "Yoga", "Budget sync", "Call with bank",
          "Piano lesson", "Book club"]
BODIES = ["See you at noon", "Running late", "Thanks for the update", "Call me back", "All set", "Sounds good",
          "Let us meet tomorrow", "Please review the draft"]
SYMBOLS = ["ACME", "GLOBX", "INIT", "NOVA", "ZEN", "BOLT", "ORCA", "PIXL"]
PAYEES = ["City Power", "Water Co", "Net Plus", "Gas Works"]
CITIES = {"San Francisco": "SFO", "New York": "JFK", "Chicago": "ORD", "Boston": "BOS", "Seattle": "SEA",
          "Denver": "DEN", "Miami": "MIA", "Austin": "AUS"}
HOTELS = ["Harbor", "Maple", "Grand", "Cedar", "Summit", "Lakeside"]
DATES = ["2025-03-03", "2025-03-04", "2025-03-05", "2025-03-06", "2025-03-07"]


def world_files(rng):
    dirs = ["/home", "/home/docs", "/home/archive", "/tmp"]
    files = {}
    for w in rng.sample(WORDS, rng.randint(3, 5)):
        lines = [f"{rng.choice(WORDS)} {rng.randint(1, 99)}" for _ in range(rng.randint(1, 3))]
        files[f"{rng.choice(dirs[:3])}/{w}_{rng.randint(1, 9)}.txt"] = "\n".join(lines)
    return {"files": files, "dirs": dirs, "cwd": "/home"}


def world_messages(rng):
    firsts = rng.sample(FIRST, rng.randint(3, 5))
    contacts = {f"c{i + 1}": {"name": f"{n} {rng.choice(LAST)}", "email": f"{n.lower()}@example.com",
                              "phone": f"555-01{rng.randint(10, 99)}"} for i, n in enumerate(firsts)}
    emails = [c["email"] for c in contacts.values()]
    inbox = {f"m{i + 1}": {"from": rng.choice(emails), "subject": s, "body": f"About the {s.lower()}.", "read": False}
             for i, s in enumerate(rng.sample(SUBJECTS, rng.randint(2, 3)))}
    return {"user": "me@example.com", "contacts": contacts, "inbox": inbox}


def world_calendar(rng):
    events = {}
    for i, t in enumerate(rng.sample(TITLES, rng.randint(2, 4))):
        h = rng.choice([8, 10, 12, 14, 16])
        date = rng.choice(DATES[:3])
        if any(e["date"] == date and e["start"] == f"{h:02d}:00" for e in events.values()):
            continue
        events[f"e{i + 1}"] = {"title": t, "date": date, "start": f"{h:02d}:00", "end": f"{h:02d}:{rng.choice(['30', '45'])}",
                               "attendees": []}
    return {"today": DATES[0], "events": events}


def world_bank(rng):
    syms = rng.sample(SYMBOLS, 3)
    return {"accounts": {"chk": {"name": "checking", "balance": float(rng.randint(10, 50) * 100)},
                         "sav": {"name": "savings", "balance": float(rng.randint(20, 200) * 100)}},
            "prices": {s: round(rng.uniform(5, 150), 2) for s in syms}, "holdings": {syms[0]: rng.randint(5, 20)},
            "payees": rng.sample(PAYEES, 2)}


def world_travel(rng):
    cities = rng.sample(sorted(CITIES), 4)
    airports = {c: CITIES[c] for c in cities}
    codes = list(airports.values())
    flights = {}
    for i in range(rng.randint(4, 6)):
        o, d = rng.sample(codes, 2)
        flights[f"FL{rng.randint(100, 999)}"] = {"origin": o, "destination": d, "date": rng.choice(DATES[2:]),
                                                 "price": float(rng.randint(9, 60) * 10), "seats": rng.randint(1, 4)}
    hotels = {f"H{i + 1}": {"city": c, "name": f"{n} Inn", "price": float(rng.randint(8, 30) * 10), "rooms": rng.randint(1, 3)}
              for i, (c, n) in enumerate(zip(rng.sample(cities, 3), rng.sample(HOTELS, 3)))}
    return {"budget": float(rng.randint(15, 40) * 100), "airports": airports, "flights": flights, "hotels": hotels,
            "seed": rng.randint(0, 10**6)}


def world_home(rng):
    devs = {"d1": {"name": "kitchen light", "room": "kitchen", "kind": "light", "on": False, "level": 100},
            "d2": {"name": "desk lamp", "room": "office", "kind": "light", "on": rng.random() < 0.5, "level": rng.randint(1, 9) * 10},
            "p1": {"name": "coffee maker", "room": "kitchen", "kind": "plug", "on": False},
            "t1": {"name": "hall thermostat", "room": "hall", "kind": "thermostat", "on": True, "celsius": float(rng.randint(17, 23))},
            "k1": {"name": "front door", "room": "hall", "kind": "lock", "locked": True}}
    keep = ["d1", "t1", "k1"] + rng.sample(["d2", "p1"], rng.randint(1, 2))
    ids = {k: f"{k[0]}{rng.randint(1, 99)}" for k in keep}  # fresh ids: the model must read them from list_devices
    if len(set(ids.values())) < len(ids):
        ids = {k: k for k in keep}
    return {"pin": f"{rng.randint(0, 9999):04d}", "devices": {ids[k]: devs[k] for k in sorted(keep)}, "scenes": {}}


WORLDS = {"files": world_files, "messages": world_messages, "calendar": world_calendar, "bank": world_bank,
          "travel": world_travel, "home": world_home, "math": lambda rng: {}}


def inflate(configs, domain, rng):
    """Long context: many distractor records in one domain (ls, list_inbox, list_events, search_flights get long)."""
    c = configs[domain]
    if domain == "files":
        for i in range(rng.randint(100, 160)):
            c["files"][f"/home/docs/old_{rng.choice(WORDS)}_{i:03d}.log"] = f"entry {i}"
    elif domain == "messages":
        for i in range(rng.randint(30, 45)):
            c["inbox"][f"m{10 + i}"] = {"from": f"news{i}@lists.example.org", "subject": f"Newsletter no. {i}",
                                        "body": "Weekly news.", "read": rng.random() < 0.3}
        c["inbox"] = dict(sorted(c["inbox"].items()))
    elif domain == "calendar":
        for i in range(rng.randint(25, 35)):
            c["events"][f"e{20 + i}"] = {"title": f"Busy block {i}", "date": DATES[3], "start": f"{7 + i % 12:02d}:{(i * 5) % 60:02d}",
                                         "end": f"{7 + i % 12:02d}:{(i * 5) % 60 + 4:02d}", "attendees": []}
    elif domain == "travel":
        codes = list(c["airports"].values())
        o, d = codes[0], codes[1]
        for i in range(rng.randint(45, 60)):
            c["flights"][f"FX{1000 + i}"] = {"origin": o, "destination": d, "date": DATES[4],
                                              "price": float(rng.randint(20, 90) * 10 + 5), "seats": rng.randint(1, 3)}
    return domain

# ----------------------------------------------------------------------------------------------
# Stage 1b + 2: atomic intents with their phrasings. An intent looks at the live state, runs its ground
# truth on the live envs (so later intents see its results: ids, prices, bookings) and returns
#   say:   the request as a clause ("book the cheapest flight from SFO to JFK on 2025-03-05 for Ann Lee")
#   steps: the ground truth, one list of (parallel) calls per assistant message
#   reply: the final answer;  refs: referents later turns may point back to ("that booking")
#   miss:  optional (clause without one value, what is missing, the question, the user's answer)
# It returns None (having run nothing) when the state does not allow it.

class World:
    """The live environments of one episode being built, the referents so far and the rng."""

    def __init__(self, rng, configs):
        self.rng, self.configs = rng, configs
        self.envs = tools.make_envs({"envs": configs})
        self.long = None        # the domain inflated with distractors (long_context), if any
        self.refs = []          # newest last: {"kind", "np": [noun phrases], ...values}
        self.results = []       # tool messages as the model will see them (long_context is decided on their length)

    def run(self, fn, **args):
        env = self.envs[tools.OWNER[fn]]
        res = env._call(fn, copy.deepcopy(args))
        self.results.append(tools.tool_message(fn, result=res)["content"])
        return {"name": fn, "arguments": args}, res

    def pick(self, xs):
        return self.rng.choice(xs)

    def ref(self, kind):
        xs = [r for r in self.refs if r["kind"] == kind]
        return xs[-1] if xs else None

    # state helpers
    def contacts(self):
        return sorted(self.envs["messages"].contacts.items()) if "messages" in self.envs else []

    def first(self, c):
        return c["name"].split()[0]

    def free_slot(self, date, minutes):
        cal = self.envs["calendar"]
        for _ in range(8):
            h = self.rng.randint(8, 17)
            s = h * 60 + self.rng.choice([0, 30])
            if cal._conflict(date, s, s + minutes) is None:
                return tools._hhmm(s), tools._hhmm(s + minutes)
        return None


def _file(w, dirs=("/home", "/home/docs", "/home/archive")):
    fs = sorted(p for p in w.envs["files"].files if p.rsplit("/", 1)[0] in dirs and p.endswith(".txt"))
    return w.pick(fs) if fs else None


def _new_path(w, d="/home"):
    fs = w.envs["files"]
    for _ in range(5):
        p = f"{d}/{w.pick(WORDS)}_{w.rng.randint(10, 99)}.txt"
        if p not in fs.files:
            return p
    return None


def _dest_dir(w, src):
    fs = w.envs["files"]
    ds = [d for d in fs.dirs if d != src.rsplit("/", 1)[0] and d != "/" and d + "/" + src.rsplit("/", 1)[1] not in fs.files]
    return w.pick(sorted(ds)) if ds else None


def files_read(w, ref=None):
    p = _file(w)
    if not p:
        return None
    call, res = w.run("cat", path=p)
    return dict(say=w.pick([f"show me {p}", f"read {p} for me", f"tell me what is in {p}", f"open {p}"]),
                steps=[[call]], reply=f"{p} says: {res['content']}", refs=[dict(kind="file", path=p, np=["that file"])])


def files_head(w, ref=None):
    p, n = _file(w), w.rng.randint(1, 3)
    if not p:
        return None
    call, res = w.run("head", path=p, lines=n)
    return dict(say=w.pick([f"show me the first {n} lines of {p}", f"print the top {n} lines of {p}"]),
                steps=[[call]], reply=f"The first lines of {p}: {res['content']}", refs=[])


def files_wc(w, ref=None):
    p = ref["path"] if ref else _file(w)
    if not p or p not in w.envs["files"].files:
        return None
    call, res = w.run("wc", path=p)
    np = w.pick(ref["np"]) if ref else p
    return dict(say=w.pick([f"count the words in {np}", f"give me the line and word count of {np}"]),
                steps=[[call]], reply=f"{res['words']} words, {res['lines']} lines.",
                refs=[dict(kind="number", value=res["words"], np=["that word count", "the number of words"])])


def files_grep(w, ref=None):
    p = _file(w)
    if not p:
        return None
    pat = w.envs["files"].files[p].split("\n")[0].split()[0]
    call, res = w.run("grep", path=p, pattern=pat)
    return dict(say=w.pick([f"find the lines containing '{pat}' in {p}", f"search {p} for '{pat}'"]),
                steps=[[call]], reply=f"Matching lines: {'; '.join(res['lines'])}", refs=[])


def files_mkdir(w, ref=None):
    d = f"/home/{w.pick(['projects', 'photos', 'backup', 'music', 'work', 'school'])}"
    if d in w.envs["files"].dirs:
        return None
    call, _ = w.run("mkdir", path=d)
    return dict(say=w.pick([f"create a folder {d}", f"make a new directory {d}"]), steps=[[call]],
                reply=f"Created {d}.", refs=[dict(kind="dir", path=d, np=["that folder", "the new folder"])])


def files_write(w, ref=None):
    p = _new_path(w, w.pick(["/home", "/home/docs"]))
    if not p:
        return None
    text = w.pick(BODIES)
    call, _ = w.run("write", path=p, content=text)
    return dict(say=w.pick([f"write '{text}' into {p}", f"save the text '{text}' to {p}"]), steps=[[call]],
                reply=f"Saved to {p}.", refs=[dict(kind="file", path=p, np=["that file", "the file you just wrote"])],
                miss=dict(say=w.pick([f"write a note to {p}", f"create {p} with some text"]), need="the text",
                          ask=f"What text should I write into {p}?", give=w.pick([f"Write '{text}'.", f"The text is '{text}'."])))


def files_copy(w, ref=None):
    src = ref["path"] if ref else _file(w)
    if not src or src not in w.envs["files"].files:
        return None
    d = ref and w.ref("dir") and w.ref("dir")["path"] or _dest_dir(w, src)
    if not d or d + "/" + src.rsplit("/", 1)[1] in w.envs["files"].files or d == src.rsplit("/", 1)[0]:
        return None
    call, res = w.run("cp", source=src, destination=d)
    np = w.pick(ref["np"]) if ref else src
    return dict(say=w.pick([f"copy {np} to {d}", f"make a copy of {np} in {d}"]), steps=[[call]],
                reply=f"Copied to {res['destination']}.",
                refs=[dict(kind="file", path=res["destination"], np=["the copy", "that copy"])],
                miss=None if ref else dict(say=f"make a copy of {src}", need="the destination folder",
                                          ask=f"Where should I copy {src} to?", give=w.pick([f"Copy it to {d}.", f"Put it in {d}."])))


def files_move(w, ref=None):
    src = _file(w)
    d = src and _dest_dir(w, src)
    if not d:
        return None
    call, res = w.run("mv", source=src, destination=d)
    return dict(say=w.pick([f"move {src} to {d}", f"put {src} into {d}"]), steps=[[call]],
                reply=f"Moved to {res['destination']}.", refs=[dict(kind="file", path=res["destination"], np=["that file"])])


def files_rm(w, ref=None):
    p = ref["path"] if ref else _file(w)
    if not p or p not in w.envs["files"].files:
        return None
    call, _ = w.run("rm", path=p)
    np = w.pick(ref["np"]) if ref else p
    return dict(say=w.pick([f"delete {np}", f"remove {np}"]), steps=[[call]], reply="Deleted.", refs=[])


def files_find_cat(w, ref=None):
    p = _file(w)
    if not p:
        return None
    name = p.rsplit("/", 1)[1]
    c1, res = w.run("find", name=name, path="/")
    if len(res.get("matches", [])) != 1:
        return None  # read-only: nothing changed
    c2, res2 = w.run("cat", path=res["matches"][0])
    return dict(say=w.pick([f"find the file {name} and show me what is in it", f"look for {name} and read it to me"]),
                steps=[[c1], [c2]], reply=f"{p} says: {res2['content']}", refs=[dict(kind="file", path=p, np=["that file"])])


def files_ls(w, ref=None):
    d = "/home/docs" if w.long == "files" else w.pick(["/home", "/home/docs", "/home/archive"])
    call, res = w.run("ls", path=d)
    return dict(say=w.pick([f"list the files in {d}", f"show me what is in the folder {d}"]), steps=[[call]],
                reply=f"{d} has {len(res['entries'])} entries.", refs=[])


def files_write_fact(w, ref):
    p = _new_path(w, "/home")
    if not p:
        return None
    call, _ = w.run("write", path=p, content=str(ref["value"]))
    np = w.pick(ref["np"])
    return dict(say=w.pick([f"save {np} to {p}", f"write {np} into a new file {p}"]), steps=[[call]],
                reply=f"Saved to {p}.", refs=[dict(kind="file", path=p, np=["that file"])])


def _contact(w):
    cs = w.contacts()
    if not cs:
        return None, None
    cid, c = w.pick(cs)
    first = w.first(c).lower()
    if sum(first in (x["name"].lower() + " " + x["email"]) for _, x in cs) != 1:
        return None, None
    return cid, c


def msg_send(w, ref=None):
    cid, c = _contact(w)
    if not c:
        return None
    f, s, b = w.first(c), w.pick(SUBJECTS), w.pick(BODIES)
    c1, _ = w.run("search_contacts", query=f)
    c2, _ = w.run("send_message", to=c["email"], subject=s, body=b)
    return dict(say=w.pick([f"send {f} an e-mail with subject '{s}' saying '{b}'", f"e-mail {f} about '{s}' with the message '{b}'",
                            f"write to {f}: subject '{s}', text '{b}'"]), steps=[[c1], [c2]], reply=f"Sent to {c['email']}.",
                refs=[dict(kind="contact", email=c["email"], id=cid, np=[f, "them"])],
                miss=dict(say=f"send {f} an e-mail with subject '{s}'", need="the message text",
                          ask=f"What should the e-mail to {f} say?", give=w.pick([f"It should say '{b}'.", f"Tell them '{b}'."])))


def msg_lookup(w, ref=None):
    cid, c = _contact(w)
    if not c:
        return None
    f = w.first(c)
    call, _ = w.run("search_contacts", query=f)
    return dict(say=w.pick([f"look up {f}'s e-mail address", f"find the e-mail of {f}"]), steps=[[call]],
                reply=f"{c['name']}: {c['email']}.", refs=[dict(kind="contact", email=c["email"], id=cid, np=[f, "that contact"])])


def msg_phone(w, ref=None):
    cid, c = _contact(w)
    if not c:
        return None
    f = w.first(c)
    c1, _ = w.run("search_contacts", query=f)
    c2, _ = w.run("get_contact", contact_id=cid)
    return dict(say=w.pick([f"get {f}'s phone number", f"tell me the phone number of {f}"]), steps=[[c1], [c2]],
                reply=f"{c['name']}: {c['phone']}.", refs=[dict(kind="contact", email=c["email"], id=cid, np=[f])])


def msg_add(w, ref=None):
    used = {w.first(c).lower() for _, c in w.contacts()}
    free = [n for n in FIRST if n.lower() not in used and not any(n.lower() in u or u in n.lower() for u in used)]
    if "messages" not in w.envs or not free:
        return None
    n = w.pick(free)
    name, email = f"{n} {w.pick(LAST)}", f"{n.lower()}.{w.rng.randint(1, 99)}@mail.com"
    call, res = w.run("add_contact", name=name, email=email)
    return dict(say=w.pick([f"add {name} ({email}) to my contacts", f"save a new contact {name} with e-mail {email}"]),
                steps=[[call]], reply=f"Added {name}.",
                refs=[dict(kind="contact", email=email, id=res["contact_id"], np=["the contact you just added", "that new contact"])],
                miss=dict(say=f"add {name} to my contacts", need="the e-mail address", ask=f"What is {name}'s e-mail address?",
                          give=w.pick([f"It is {email}.", f"Use {email}."])))


def msg_update_phone(w, ref=None):
    cid, c = _contact(w)
    if not c:
        return None
    f, ph = w.first(c), f"555-02{w.rng.randint(10, 99)}"
    c1, _ = w.run("search_contacts", query=f)
    c2, _ = w.run("update_contact", contact_id=cid, field="phone", value=ph)
    return dict(say=w.pick([f"change {f}'s phone number to {ph}", f"update the phone of {f} to {ph}"]), steps=[[c1], [c2]],
                reply="Updated.", refs=[],
                miss=dict(say=f"change {f}'s phone number", need="the new number", ask=f"What is {f}'s new phone number?",
                          give=w.pick([f"It is {ph}.", f"The new number is {ph}."])))


def msg_delete_contact(w, ref=None):
    cid, c = _contact(w)
    if not c or ref:
        return None
    f = w.first(c)
    c1, _ = w.run("search_contacts", query=f)
    c2, _ = w.run("delete_contact", contact_id=cid)
    return dict(say=w.pick([f"remove {f} from my contacts", f"delete the contact {f}"]), steps=[[c1], [c2]], reply="Removed.", refs=[])


def _inbox_msg(w):
    box = sorted(w.envs["messages"].inbox.items()) if "messages" in w.envs else []
    box = [(i, m) for i, m in box if m["subject"] in SUBJECTS]
    return w.pick(box) if box else (None, None)


def msg_read(w, ref=None):
    mid, m = _inbox_msg(w)
    if not m:
        return None
    c1, _ = w.run("search_messages", query=m["subject"])
    c2, _ = w.run("read_message", message_id=mid)
    return dict(say=w.pick([f"read the message about '{m['subject']}'", f"open the e-mail with subject '{m['subject']}'"]),
                steps=[[c1], [c2]], reply=f"From {m['from']}: {m['body']}", refs=[])


def msg_reply(w, ref=None):
    mid, m = _inbox_msg(w)
    if not m:
        return None
    b = w.pick(BODIES)
    c1, _ = w.run("search_messages", query=m["subject"])
    c2, _ = w.run("reply", message_id=mid, body=b)
    return dict(say=w.pick([f"reply to the message about '{m['subject']}' with '{b}'", f"answer the '{m['subject']}' e-mail: '{b}'"]),
                steps=[[c1], [c2]], reply="Replied.", refs=[],
                miss=dict(say=f"reply to the message about '{m['subject']}'", need="the reply text",
                          ask="What should the reply say?", give=w.pick([f"Say '{b}'.", f"Reply '{b}'."])))


def msg_delete(w, ref=None):
    mid, m = _inbox_msg(w)
    if not m:
        return None
    c1, _ = w.run("search_messages", query=m["subject"])
    c2, _ = w.run("delete_message", message_id=mid)
    return dict(say=w.pick([f"delete the e-mail about '{m['subject']}'", f"remove the '{m['subject']}' message"]),
                steps=[[c1], [c2]], reply="Deleted.", refs=[])


def msg_inbox_from(w, ref=None):
    """Long-context friendly: the inbox listing may be long; one message comes from the named contact."""
    cs = {c["email"]: c for _, c in w.contacts()}
    box = sorted(w.envs["messages"].inbox.items()) if cs else []
    senders = Counter(m["from"] for _, m in box)
    mine = [(i, m) for i, m in box if m["from"] in cs and senders[m["from"]] == 1]
    if not mine:
        return None
    mid, m = w.pick(mine)
    f = w.first(cs[m["from"]])
    c1, _ = w.run("list_inbox")
    c2, _ = w.run("read_message", message_id=mid)
    return dict(say=w.pick([f"check my inbox and open the message from {m['from']}", f"list my e-mails and read the one {m['from']} sent"]),
                steps=[[c1], [c2]], reply=f"{f} wrote: {m['body']}", refs=[])


def msg_send_fact(w, ref):
    cid, c = _contact(w)
    if not c:
        return None
    f, s = w.first(c), w.pick(SUBJECTS)
    c1, _ = w.run("search_contacts", query=f)
    c2, _ = w.run("send_message", to=c["email"], subject=s, body=str(ref["value"]))
    np = w.pick(ref["np"])
    return dict(say=w.pick([f"e-mail {np} to {f} with subject '{s}'", f"send {f} {np} in an e-mail titled '{s}'"]),
                steps=[[c1], [c2]], reply=f"Sent to {c['email']}.", refs=[])


def msg_send_to_ref(w, ref):
    if "messages" not in w.envs or not any(c["email"] == ref["email"] for _, c in w.contacts()):
        return None
    s, b = w.pick(SUBJECTS), w.pick(BODIES)
    call, _ = w.run("send_message", to=ref["email"], subject=s, body=b)
    np = w.pick(ref["np"])
    return dict(say=w.pick([f"send {np} an e-mail with subject '{s}' saying '{b}'", f"e-mail {np}: subject '{s}', text '{b}'"]),
                steps=[[call]], reply=f"Sent to {ref['email']}.", refs=[])


def _event(w):
    evs = sorted((i, e) for i, e in w.envs["calendar"].events.items() if e["title"] in TITLES) if "calendar" in w.envs else []
    return w.pick(evs) if evs else (None, None)


def cal_list(w, ref=None):
    d = DATES[3] if w.long == "calendar" else w.pick(DATES[:4])
    call, res = w.run("list_events", date=d)
    titles = [e["title"] for e in res["events"]]
    return dict(say=w.pick([f"show my calendar for {d}", f"list my events on {d}"]), steps=[[call]],
                reply=f"{len(titles)} events on {d}" + (": " + ", ".join(titles[:5]) if titles else "") + ".", refs=[])


def cal_create(w, ref=None):
    title, d = w.pick(["Coffee chat", "Haircut", "Tax prep", "Car service", "Kickoff", "Dinner"]), w.pick(DATES)
    slot = w.free_slot(d, w.pick([30, 60]))
    if not slot:
        return None
    call, res = w.run("create_event", title=title, date=d, start=slot[0], end=slot[1])
    return dict(say=w.pick([f"add '{title}' to my calendar on {d} from {slot[0]} to {slot[1]}", f"schedule '{title}' on {d}, {slot[0]}-{slot[1]}"]),
                steps=[[call]], reply=f"Scheduled as {res['event_id']}.",
                refs=[dict(kind="event", id=res["event_id"], np=[f"the '{title}' event", "that event"]),
                      dict(kind="fact", value=res["event_id"], np=["the event id", "the id of that event"])],
                miss=dict(say=f"add '{title}' to my calendar on {d}", need="the time", ask=f"When should '{title}' start and end?",
                          give=w.pick([f"From {slot[0]} to {slot[1]}.", f"{slot[0]} to {slot[1]}, please."])))


def cal_slot_create(w, ref=None):
    title, d, dur = w.pick(["Focus time", "Planning", "Interview", "Workout"]), w.pick(DATES[:4]), w.pick([30, 45, 60])
    c1, res = w.run("find_free_slot", date=d, duration_minutes=dur)
    if "error" in res:
        return None
    c2, res2 = w.run("create_event", title=title, date=d, start=res["start"], end=res["end"])
    return dict(say=w.pick([f"find a free {dur}-minute slot on {d} and book '{title}' in it",
                            f"schedule '{title}' for {dur} minutes at the first free time on {d}"]),
                steps=[[c1], [c2]], reply=f"'{title}' is on {d} at {res['start']}.",
                refs=[dict(kind="event", id=res2["event_id"], np=[f"the '{title}' event", "that event"])])


def cal_move(w, ref=None):
    eid, e = (ref["id"], w.envs["calendar"].events.get(ref["id"])) if ref else _event(w)
    if not e:
        return None
    length = tools._minutes(e["end"]) - tools._minutes(e["start"])
    d = w.pick(DATES)
    slot = w.free_slot(d, length)
    if not slot:
        return None
    steps = []
    if not ref:
        c1, _ = w.run("search_events", query=e["title"])
        steps.append([c1])
    c2, _ = w.run("move_event", event_id=eid, date=d, start=slot[0])
    steps.append([c2])
    np = w.pick(ref["np"]) if ref else f"'{e['title']}'"
    return dict(say=w.pick([f"move {np} to {d} at {slot[0]}", f"reschedule {np} to {slot[0]} on {d}"]), steps=steps,
                reply=f"Moved to {d} {slot[0]}.", refs=[dict(kind="event", id=eid, np=[f"the '{e['title']}' event", "that event"])])


def cal_cancel(w, ref=None):
    eid, e = (ref["id"], w.envs["calendar"].events.get(ref["id"])) if ref else _event(w)
    if not e:
        return None
    steps = []
    if not ref:
        c1, _ = w.run("search_events", query=e["title"])
        steps.append([c1])
    c2, _ = w.run("cancel_event", event_id=eid)
    steps.append([c2])
    np = w.pick(ref["np"]) if ref else f"'{e['title']}'"
    return dict(say=w.pick([f"cancel {np}", f"delete {np} from my calendar"]), steps=steps, reply="Cancelled.", refs=[])


def cal_invite(w, ref=None):
    """ref: an event (invite a literal address) or a contact (invite them to a named event)."""
    if ref and ref["kind"] == "event":
        eid, e = ref["id"], w.envs["calendar"].events.get(ref["id"])
    else:
        eid, e = _event(w)
    email = ref["email"] if ref and ref["kind"] == "contact" else f"{w.pick(FIRST).lower()}@work.org"
    if not e or email in e["attendees"]:
        return None
    steps = []
    if not (ref and ref["kind"] == "event"):
        c1, _ = w.run("search_events", query=e["title"])
        steps.append([c1])
    c2, _ = w.run("add_attendee", event_id=eid, email=email)
    steps.append([c2])
    who = w.pick(ref["np"]) if ref and ref["kind"] == "contact" else email
    ev = w.pick(ref["np"]) if ref and ref["kind"] == "event" else f"'{e['title']}'"
    out = dict(say=w.pick([f"invite {who} to {ev}", f"add {who} as an attendee of {ev}"]), steps=steps, reply="Invited.", refs=[])
    if not ref:
        out["miss"] = dict(say=f"invite someone to '{e['title']}'", need="the e-mail address", ask="Whom should I invite? I need an e-mail address.",
                           give=w.pick([f"Invite {email}.", f"The address is {email}."]))
    return out


def cal_free_slot(w, ref=None):
    d, dur = w.pick(DATES[:4]), w.pick([30, 60, 90])
    call, res = w.run("find_free_slot", date=d, duration_minutes=dur)
    if "error" in res:
        return None
    return dict(say=w.pick([f"find me a free {dur}-minute slot on {d}", f"check when I have {dur} free minutes on {d}"]),
                steps=[[call]], reply=f"{res['start']}-{res['end']} is free.", refs=[])


ACCT = {"chk": ["chk", "my checking account chk", "checking (chk)"], "sav": ["sav", "my savings account sav", "savings (sav)"]}


def bank_balance(w, ref=None):
    a = w.pick(["chk", "sav"])
    call, res = w.run("get_balance", account_id=a)
    return dict(say=w.pick([f"check the balance of {w.pick(ACCT[a])}", f"tell me how much money is in {w.pick(ACCT[a])}"]),
                steps=[[call]], reply=f"{a} has {res['balance']}.",
                refs=[dict(kind="number", value=res["balance"], np=["that balance", "the balance"])])


def bank_balances(w, ref=None):
    c1, r1 = w.run("get_balance", account_id="chk")
    c2, r2 = w.run("get_balance", account_id="sav")
    return dict(say=w.pick(["check the balances of chk and sav", "tell me what is in both chk and sav"]), steps=[[c1, c2]],
                reply=f"chk: {r1['balance']}, sav: {r2['balance']}.", refs=[])


def bank_transfer(w, ref=None):
    a, b = w.rng.sample(["chk", "sav"], 2)
    amt = w.rng.randint(1, 9) * 50
    if amt > w.envs["bank"].accounts[a]["balance"]:
        return None
    call, _ = w.run("transfer", from_account=a, to_account=b, amount=amt)
    return dict(say=w.pick([f"transfer {amt} from {w.pick(ACCT[a])} to {b}", f"move {amt} dollars from {a} to {w.pick(ACCT[b])}"]),
                steps=[[call]], reply="Transferred.", refs=[],
                miss=dict(say=f"transfer some money from {a} to {b}", need="the amount", ask=f"How much should I transfer from {a} to {b}?",
                          give=w.pick([f"{amt}, please.", f"Make it {amt}."])))


def bank_pay(w, ref=None):
    a, payee, amt = w.pick(["chk", "sav"]), w.pick(w.envs["bank"].payees), w.rng.randint(2, 30) * 5
    if amt > w.envs["bank"].accounts[a]["balance"]:
        return None
    call, res = w.run("pay_bill", account_id=a, payee=payee, amount=amt)
    return dict(say=w.pick([f"pay {amt} to {payee} from {a}", f"pay my {payee} bill of {amt} using {w.pick(ACCT[a])}"]),
                steps=[[call]], reply=f"Paid; transaction {res['transaction_id']}.", refs=[],
                miss=dict(say=f"pay my {payee} bill from {a}", need="the amount", ask=f"How much is the {payee} bill?",
                          give=w.pick([f"It is {amt}.", f"{amt}."])))


def bank_buy(w, ref=None):
    b = w.envs["bank"]
    a, sym, n = w.pick(["chk", "sav"]), w.pick(sorted(b.prices)), w.rng.randint(1, 10)
    if n * b.prices[sym] > b.accounts[a]["balance"]:
        return None
    c1, q = w.run("get_quote", symbol=sym)
    c2, res = w.run("place_order", account_id=a, symbol=sym, side="buy", shares=n, price=q["price"])
    return dict(say=w.pick([f"buy {n} shares of {sym} with money from {a}", f"get me {n} {sym} shares using {w.pick(ACCT[a])}"]),
                steps=[[c1], [c2]], reply=f"Bought; order {res['order_id']}, total {res['total']}.",
                refs=[dict(kind="order", id=res["order_id"], np=["that order", "the order you just placed"]),
                      dict(kind="fact", value=res["order_id"], np=["the order id", "that order number"])],
                miss=dict(say=f"buy some {sym} shares with money from {a}", need="the number of shares",
                          ask=f"How many {sym} shares should I buy?", give=w.pick([f"{n} shares.", f"Buy {n}."])))


def bank_sell(w, ref=None):
    b = w.envs["bank"]
    held = [s for s, k in sorted(b.holdings.items()) if k > 0]
    if not held:
        return None
    sym = w.pick(held)
    n, a = w.rng.randint(1, b.holdings[sym]), w.pick(["chk", "sav"])
    c1, q = w.run("get_quote", symbol=sym)
    c2, res = w.run("place_order", account_id=a, symbol=sym, side="sell", shares=n, price=q["price"])
    return dict(say=w.pick([f"sell {n} shares of {sym} into {a}", f"sell {n} {sym} shares and put the money in {w.pick(ACCT[a])}"]),
                steps=[[c1], [c2]], reply=f"Sold for {res['total']}.",
                refs=[dict(kind="order", id=res["order_id"], np=["that sale", "that order"])])


def bank_quote(w, ref=None):
    sym = w.pick(sorted(w.envs["bank"].prices))
    call, res = w.run("get_quote", symbol=sym)
    return dict(say=w.pick([f"get the price of {sym}", f"look up the current {sym} stock price"]), steps=[[call]],
                reply=f"{sym} is at {res['price']}.", refs=[dict(kind="number", value=res["price"], np=["that price", f"the {sym} price"])])


def bank_txns(w, ref=None):
    a, k = w.pick(["chk", "sav"]), w.rng.randint(2, 5)
    call, res = w.run("list_transactions", account_id=a, limit=k)
    return dict(say=w.pick([f"show the last {k} transactions of {a}", f"list {k} recent transactions on {w.pick(ACCT[a])}"]),
                steps=[[call]], reply=f"{len(res['transactions'])} transactions.", refs=[])


def bank_holdings(w, ref=None):
    call, res = w.run("list_holdings")
    return dict(say=w.pick(["show my stock holdings", "list the shares I own"]), steps=[[call]], reply=f"Holdings: {res['holdings']}.", refs=[])


def bank_accounts(w, ref=None):
    call, _ = w.run("list_accounts")
    return dict(say=w.pick(["list my bank accounts", "show all my accounts with balances"]), steps=[[call]], reply="Here they are.", refs=[])


def bank_order_ref(w, ref):
    o = w.envs["bank"].orders.get(ref["id"])
    if not o or o["status"] != "filled":
        return None
    name = w.pick(["cancel_order", "get_order"])
    if name == "cancel_order":
        b = w.envs["bank"]
        short = b.holdings.get(o["symbol"], 0) < o["shares"] if o["side"] == "buy" else \
            b.accounts[o["account"]]["balance"] < o["shares"] * o["price"]
        if short:  # the reversal would fail
            return None
    call, _ = w.run(name, order_id=ref["id"])
    np = w.pick(ref["np"])
    say = w.pick([f"cancel {np}", f"undo {np}"]) if name == "cancel_order" else w.pick([f"show me the details of {np}", f"check the status of {np}"])
    return dict(say=say, steps=[[call]], reply="Done.", refs=[])


def _route(w):
    t = w.envs["travel"]
    routes = Counter((f["origin"], f["destination"], f["date"]) for f in t.flights.values() if f["seats"] > 0)
    if w.long == "travel":
        return routes.most_common(1)[0][0]
    return w.pick(sorted(routes)) if routes else None


def travel_flight(w, ref=None):
    t = w.envs["travel"]
    r = _route(w)
    if not r:
        return None
    o, d, date = r
    who = f"{w.pick(FIRST)} {w.pick(LAST)}"
    fl = sorted((f["price"], i) for i, f in t.flights.items() if (f["origin"], f["destination"], f["date"]) == r)
    if t.flights[fl[0][1]]["seats"] < 1 or fl[0][0] > t.budget:
        return None  # keep "the cheapest" unambiguous and bookable
    steps, by_city = [], w.rng.random() < 0.3
    city = {v: k for k, v in t.airports.items()}
    if by_city:
        a1, _ = w.run("airport_code", city=city[o])
        a2, _ = w.run("airport_code", city=city[d])
        steps.append([a1, a2])
    c1, _ = w.run("search_flights", origin=o, destination=d, date=date)
    c2, res = w.run("book_flight", flight_id=fl[0][1], passenger=who)
    steps += [[c1], [c2]]
    src, dst = (city[o], city[d]) if by_city else (o, d)
    return dict(say=w.pick([f"book the cheapest flight from {src} to {dst} on {date} for {who}",
                            f"find flights from {src} to {dst} on {date} and book the cheapest one for {who}"]),
                steps=steps, reply=f"Booked {fl[0][1]}: booking {res['booking_id']}, {res['budget_left']} left.",
                refs=[dict(kind="booking", id=res["booking_id"], np=["that booking", "the flight booking"]),
                      dict(kind="fact", value=res["booking_id"], np=["the booking id", "that booking number"])])


def travel_hotel(w, ref=None):
    t = w.envs["travel"]
    cities = sorted({h["city"] for h in t.hotels.values() if h["rooms"] > 0})
    if not cities:
        return None
    city, nights, who = w.pick(cities), w.rng.randint(1, 4), f"{w.pick(FIRST)} {w.pick(LAST)}"
    hs = sorted((h["price"], i) for i, h in t.hotels.items() if h["city"] == city and h["rooms"] > 0)
    if hs[0][0] * nights > t.budget:
        return None
    c1, _ = w.run("search_hotels", city=city)
    c2, res = w.run("book_hotel", hotel_id=hs[0][1], guest=who, nights=nights)
    return dict(say=w.pick([f"book the cheapest hotel in {city} for {who}, {nights} nights",
                            f"find a hotel in {city} and book the cheapest one for {nights} nights for {who}"]),
                steps=[[c1], [c2]], reply=f"Booked {hs[0][1]}: booking {res['booking_id']}.",
                refs=[dict(kind="booking", id=res["booking_id"], np=["that hotel booking", "the hotel reservation"]),
                      dict(kind="fact", value=res["booking_id"], np=["the hotel booking id", "the reservation number"])],
                miss=dict(say=f"book the cheapest hotel in {city} for {who}", need="the number of nights",
                          ask="For how many nights?", give=w.pick([f"{nights} nights.", f"Make it {nights} nights."])))


def travel_booking_ref(w, ref):
    if ref["id"] not in w.envs["travel"].bookings:
        return None
    name = w.pick(["cancel_booking", "get_booking"])
    call, _ = w.run(name, booking_id=ref["id"])
    np = w.pick(ref["np"])
    say = w.pick([f"cancel {np}", f"call off {np}"]) if name == "cancel_booking" else w.pick([f"show me the details of {np}", f"look up {np}"])
    return dict(say=say, steps=[[call]], reply="Done.", refs=[])


def travel_bookings(w, ref=None):
    call, res = w.run("list_bookings")
    return dict(say=w.pick(["show all my travel bookings", "list my bookings"]), steps=[[call]],
                reply=f"{len(res['bookings'])} bookings, {res['budget_left']} budget left.", refs=[])


def travel_budget(w, ref=None):
    amt = w.rng.randint(10, 50) * 100
    call, _ = w.run("set_budget", amount=amt)
    return dict(say=w.pick([f"set my travel budget to {amt}", f"change the travel budget to {amt}"]), steps=[[call]],
                reply=f"Budget is {amt}.", refs=[], miss=dict(say="change my travel budget", need="the new budget",
                                                            ask="What should the new budget be?", give=w.pick([f"{amt}.", f"Set it to {amt}."])))


def travel_code(w, ref=None):
    city = w.pick(sorted(w.envs["travel"].airports))
    call, res = w.run("airport_code", city=city)
    return dict(say=w.pick([f"look up the airport code of {city}", f"find the airport code for {city}"]), steps=[[call]],
                reply=f"{city} is {res['code']}.", refs=[])


def travel_flight_info(w, ref=None):
    fid = w.pick(sorted(w.envs["travel"].flights))
    call, res = w.run("get_flight", flight_id=fid)
    return dict(say=w.pick([f"show me the details of flight {fid}", f"look up flight {fid}"]), steps=[[call]],
                reply=f"{fid}: {res['origin']}-{res['destination']} on {res['date']}, {res['price']}.", refs=[])


def _device(w, kinds):
    ds = sorted((i, d) for i, d in w.envs["home"].devices.items() if d["kind"] in kinds)
    return w.pick(ds) if ds else (None, None)


def home_switch(w, ref=None):
    did, d = _device(w, ("light", "plug", "thermostat"))
    on = not d["on"]
    c1, _ = w.run("list_devices")
    c2, _ = w.run("turn_on" if on else "turn_off", device_id=did)
    word = "on" if on else "off"
    return dict(say=w.pick([f"turn {word} the {d['name']}", f"switch the {d['name']} {word}"]), steps=[[c1], [c2]],
                reply=f"The {d['name']} is {word}.", refs=[dict(kind="device", id=did, np=[f"the {d['name']}", "it"])])


def home_brightness(w, ref=None):
    did, d = _device(w, ("light",))
    lvl = w.rng.randint(1, 10) * 10
    c1, _ = w.run("list_devices")
    c2, _ = w.run("set_brightness", device_id=did, level=lvl)
    return dict(say=w.pick([f"set the {d['name']} to {lvl}% brightness", f"dim the {d['name']} to {lvl} percent"]),
                steps=[[c1], [c2]], reply="Done.", refs=[],
                miss=dict(say=f"change the brightness of the {d['name']}", need="the brightness level",
                          ask="What brightness level, in percent?", give=w.pick([f"{lvl} percent.", f"Make it {lvl}%."])))


def home_temp(w, ref=None):
    did, d = _device(w, ("thermostat",))
    c1, _ = w.run("list_devices")
    if w.rng.random() < 0.35:  # Fahrenheit: convert first (math env), in parallel with the look-up
        f = w.rng.randint(60, 78)
        c0, r = w.run("convert_units", value=f, from_unit="F", to_unit="C")
        c2, _ = w.run("set_temperature", device_id=did, celsius=r["result"])
        return dict(say=w.pick([f"set the {d['name']} to {f} degrees Fahrenheit", f"make it {f}F on the {d['name']}"]),
                    steps=[[c1, c0], [c2]], reply=f"Set to {r['result']} C.", refs=[])
    t = w.rng.randint(16, 26)
    c2, _ = w.run("set_temperature", device_id=did, celsius=t)
    return dict(say=w.pick([f"set the {d['name']} to {t} degrees", f"change the {d['name']} to {t} C"]), steps=[[c1], [c2]],
                reply="Done.", refs=[])


def home_lock(w, ref=None):
    did, d = _device(w, ("lock",))
    c1, _ = w.run("list_devices")
    if d["locked"]:
        pin = w.envs["home"].pin
        c2, _ = w.run("unlock", device_id=did, pin=pin)
        return dict(say=w.pick([f"unlock the {d['name']} with PIN {pin}", f"open the {d['name']} lock, the PIN is {pin}"]),
                    steps=[[c1], [c2]], reply="Unlocked.", refs=[],
                    miss=dict(say=f"unlock the {d['name']}", need="the PIN", ask="What is the PIN?",
                              give=w.pick([f"The PIN is {pin}.", f"It's {pin}."])))
    c2, _ = w.run("lock", device_id=did)
    return dict(say=w.pick([f"lock the {d['name']}", f"make sure the {d['name']} is locked"]), steps=[[c1], [c2]], reply="Locked.", refs=[])


def home_scene(w, ref=None):
    ds = sorted(i for i, d in w.envs["home"].devices.items() if d["kind"] in ("light", "plug"))
    if len(ds) < 2 or len(w.envs["home"].scenes) > 2:
        return None
    pair = sorted(w.rng.sample(ds, 2))
    sc = w.pick(["evening", "movie night", "morning", "away", "reading"])
    if sc in w.envs["home"].scenes:
        return None
    names = [w.envs["home"].devices[i]["name"] for i in pair]
    c1, _ = w.run("list_devices")
    c2, _ = w.run("create_scene", name=sc, device_ids=pair)
    return dict(say=w.pick([f"save the {names[0]} and the {names[1]} as a scene called '{sc}'",
                            f"create a scene '{sc}' with the {names[0]} and the {names[1]}"]), steps=[[c1], [c2]],
                reply=f"Scene '{sc}' saved.", refs=[dict(kind="scene", name=sc, np=[f"the '{sc}' scene", "that scene"])])


def home_scene_ref(w, ref):
    call, _ = w.run("activate_scene", name=ref["name"])
    return dict(say=w.pick([f"activate {w.pick(ref['np'])}", f"switch to {w.pick(ref['np'])}"]), steps=[[call]], reply="Activated.", refs=[])


def home_status(w, ref=None):
    did, d = (ref["id"], w.envs["home"].devices[ref["id"]]) if ref else _device(w, ("light", "plug", "thermostat", "lock"))
    steps = []
    if not ref:
        c1, _ = w.run("list_devices")
        steps.append([c1])
    c2, _ = w.run("get_device", device_id=did)
    steps.append([c2])
    np = w.pick(ref["np"]) if ref else f"the {d['name']}"
    return dict(say=w.pick([f"check the status of {np}", f"tell me how {np} is set"]), steps=steps, reply="Here is its status.", refs=[])


def _num_ref(value, np):
    return [dict(kind="number", value=value, np=np), dict(kind="fact", value=value, np=["that result", "the result"])]


MATH_OPS = {  # name: (argument builder, phrasings with {a} {b})
    "add": (lambda r: dict(a=r.randint(2, 500), b=r.randint(2, 500)), ["add {a} and {b}", "compute {a} plus {b}"]),
    "subtract": (lambda r: dict(a=r.randint(100, 900), b=r.randint(2, 99)), ["subtract {b} from {a}", "compute {a} minus {b}"]),
    "multiply": (lambda r: dict(a=r.randint(2, 99), b=r.randint(2, 30)), ["multiply {a} by {b}", "compute {a} times {b}"]),
    "divide": (lambda r: dict(a=r.randint(10, 999), b=r.randint(2, 12)), ["divide {a} by {b}", "compute {a} divided by {b}"]),
    "power": (lambda r: dict(base=r.randint(2, 12), exponent=r.randint(2, 4)),
              ["raise {base} to the power {exponent}", "compute {base} to the {exponent}"]),
    "sqrt": (lambda r: dict(x=r.randint(2, 40) ** 2), ["take the square root of {x}", "compute the square root of {x}"]),
    "percentage": (lambda r: dict(part=r.randint(1, 99), whole=r.randint(100, 400)),
                   ["work out what percent {part} is of {whole}", "compute {part} as a percentage of {whole}"]),
    "round_number": (lambda r: dict(x=round(r.uniform(1, 99), 4), digits=r.randint(0, 2)), ["round {x} to {digits} decimal places"]),
    "mean": (lambda r: dict(numbers=[r.randint(1, 99) for _ in range(r.randint(3, 5))]),
             ["average the numbers {numbers}", "compute the mean of {numbers}"]),
    "convert_units": (lambda r: dict(zip(("value", "from_unit", "to_unit"), (r.randint(1, 200), *r.choice(
                          [("km", "mile"), ("mile", "km"), ("kg", "lb"), ("lb", "kg"), ("l", "gallon"), ("C", "F"), ("ft", "m")])))),
                      ["convert {value} {from_unit} to {to_unit}", "tell me what {value} {from_unit} is in {to_unit}"]),
    "add_days": (lambda r: dict(date=r.choice(DATES), days=r.randint(2, 40)),
                 ["tell me the date {days} days after {date}", "add {days} days to {date}"]),
    "days_between": (lambda r: dict(start=r.choice(DATES), end=f"2025-{r.randint(4, 12):02d}-{r.randint(10, 28)}"),
                     ["count the days from {start} to {end}", "tell me how many days are between {start} and {end}"]),
}


def math_op(w, ref=None, name=None):
    name = name or w.pick(sorted(MATH_OPS))
    build, says = MATH_OPS[name]
    args = build(w.rng)
    call, res = w.run(name, **args)
    if "error" in res:
        return None
    shown = {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in args.items()}
    if "date" in res:
        return dict(say=w.pick(says).format(**shown), steps=[[call]], reply=f"It is {res['date']}.", refs=[])
    val = res.get("result", res.get("days"))
    return dict(say=w.pick(says).format(**shown), steps=[[call]], reply=f"The result is {val}.",
                refs=_num_ref(val, ["that result", "the result", "that number"]))


def math_chain(w, ref):
    """A number from before feeds one more operation ("multiply that by 3")."""
    v = ref["value"]
    name, b = w.pick(["add", "multiply", "subtract", "divide", "round_number", "percentage"]), w.rng.randint(2, 12)
    args = {"round_number": dict(x=v, digits=1), "percentage": dict(part=v, whole=b * 100)}.get(name, dict(a=v, b=b))
    call, res = w.run(name, **args)
    if "error" in res:
        return None
    np = w.pick(ref["np"])
    say = {"add": f"add {b} to {np}", "multiply": f"multiply {np} by {b}", "subtract": f"subtract {b} from {np}",
           "divide": f"divide {np} by {b}", "round_number": f"round {np} to 1 decimal place",
           "percentage": f"work out what percent {np} is of {b * 100}"}[name]
    return dict(say=say, steps=[[call]], reply=f"The result is {res['result']}.", refs=_num_ref(res["result"], ["that result", "the new result"]))


def math_pair(w, ref=None):
    """Two independent calculations: one parallel step."""
    n1, n2 = w.rng.sample(["add", "multiply", "subtract", "divide", "sqrt", "percentage"], 2)
    a, b = math_op(w, name=n1), math_op(w, name=n2)
    if not a or not b:
        return None
    return dict(say=f"{a['say']} and {b['say']}", steps=[a["steps"][0] + b["steps"][0]], reply=a["reply"] + " " + b["reply"], refs=[])


# error recovery: the first attempt fails for a reason the result explains; the fix follows (gt has both)
def err_cat(w, ref=None):
    fs = sorted(p for p in w.envs["files"].files if p.startswith("/home/docs/") and p.endswith(".txt"))
    if not fs or w.envs["files"].cwd != "/home":
        return None
    p = w.pick(fs)
    name = p.rsplit("/", 1)[1]
    c1, r1 = w.run("cat", path=name)
    c2, r2 = w.run("find", name=name, path="/")
    if "error" not in r1 or r2.get("matches") != [p]:
        return None
    c3, r3 = w.run("cat", path=p)
    return dict(say=w.pick([f"show me {name}", f"read {name} for me"]), steps=[[c1], [c2], [c3]], fails=[0],
                reply=f"{p} says: {r3['content']}", refs=[dict(kind="file", path=p, np=["that file"])])


def err_order(w, ref=None):
    b = w.envs["bank"]
    a, sym, n = w.pick(["chk", "sav"]), w.pick(sorted(b.prices)), w.rng.randint(1, 5)
    stale = round(b.prices[sym] * w.pick([0.9, 0.95, 1.05]), 2)
    if stale == b.prices[sym] or n * b.prices[sym] > b.accounts[a]["balance"]:
        return None
    c1, _ = w.run("place_order", account_id=a, symbol=sym, side="buy", shares=n, price=stale)
    c2, q = w.run("get_quote", symbol=sym)
    c3, res = w.run("place_order", account_id=a, symbol=sym, side="buy", shares=n, price=q["price"])
    return dict(say=w.pick([f"buy {n} shares of {sym} at {stale} using {a}", f"place an order for {n} {sym} at {stale} a share from {a}"]),
                steps=[[c1], [c2], [c3]], fails=[0], reply=f"The price had changed; bought at {q['price']}, order {res['order_id']}.",
                refs=[dict(kind="order", id=res["order_id"], np=["that order"]), dict(kind="fact", value=res["order_id"], np=["the order id"])])


def err_event(w, ref=None):
    cal = w.envs["calendar"]
    evs = sorted((i, e) for i, e in cal.events.items() if e["title"] in TITLES)
    if not evs:
        return None
    _, e = w.pick(evs)
    title = w.pick(["Sync", "Lunch break", "Review call"])
    s = e["start"]
    end = tools._hhmm(tools._minutes(s) + 30)
    c1, r1 = w.run("create_event", title=title, date=e["date"], start=s, end=end)
    if "error" not in r1:
        return None  # (unreachable: it overlaps by construction) a created event would be a silent state change
    c2, slot = w.run("find_free_slot", date=e["date"], duration_minutes=30, earliest=s)
    if "error" in slot:
        return None
    c3, r3 = w.run("create_event", title=title, date=e["date"], start=slot["start"], end=slot["end"])
    return dict(say=f"schedule '{title}' on {e['date']} from {s} to {end}, or at the next free 30 minutes after {s} if that is taken",
                steps=[[c1], [c2], [c3]], fails=[0], reply=f"{s} was taken; '{title}' is at {slot['start']}.",
                refs=[dict(kind="event", id=r3["event_id"], np=[f"the '{title}' event", "that event"])])


# domain -> intents that start from the state alone; referent kind -> intents that consume one
FRESH = {"files": [files_read, files_head, files_wc, files_grep, files_mkdir, files_write, files_copy, files_move, files_rm,
                   files_find_cat, files_ls],
         "messages": [msg_send, msg_lookup, msg_phone, msg_add, msg_update_phone, msg_delete_contact, msg_read, msg_reply,
                      msg_delete, msg_inbox_from],
         "calendar": [cal_list, cal_create, cal_slot_create, cal_move, cal_cancel, cal_invite, cal_free_slot],
         "bank": [bank_balance, bank_balances, bank_transfer, bank_pay, bank_buy, bank_sell, bank_quote, bank_txns,
                  bank_holdings, bank_accounts],
         "travel": [travel_flight, travel_hotel, travel_bookings, travel_budget, travel_code, travel_flight_info],
         "home": [home_switch, home_brightness, home_temp, home_lock, home_scene, home_status],
         "math": [math_op, math_op, math_op, math_pair]}
CONSUMERS = {"file": [files_wc, files_copy, files_rm], "fact": [msg_send_fact, files_write_fact],
             "contact": [msg_send_to_ref, cal_invite], "event": [cal_move, cal_cancel, cal_invite],
             "number": [math_chain], "booking": [travel_booking_ref], "order": [bank_order_ref],
             "scene": [home_scene_ref], "device": [home_status]}
NEEDS = {msg_send_fact: "messages", files_write_fact: "files", msg_send_to_ref: "messages", cal_invite: "calendar",
         files_wc: "files", files_copy: "files", files_rm: "files", cal_move: "calendar", cal_cancel: "calendar"}
MISSABLE = {files_write, files_copy, msg_send, msg_add, msg_update_phone, msg_reply, cal_create, cal_invite, bank_transfer,
            bank_pay, bank_buy, travel_hotel, travel_budget, home_brightness, home_lock}  # intents that can return "miss"
ERRORS = {"files": err_cat, "bank": err_order, "calendar": err_event}
LONG = {"files": files_ls, "messages": msg_inbox_from, "calendar": cal_list, "travel": travel_flight}
# functions an intent may call: to force held-out pairs into test episodes and keep them out of train
FUNCS = {files_read: "cat", files_head: "head", files_wc: "wc", files_grep: "grep", files_mkdir: "mkdir", files_write: "write",
         files_copy: "cp", files_move: "mv", files_rm: "rm", files_find_cat: "find cat", files_ls: "ls", files_write_fact: "write",
         msg_send: "search_contacts send_message", msg_lookup: "search_contacts", msg_phone: "search_contacts get_contact",
         msg_add: "add_contact", msg_update_phone: "search_contacts update_contact", msg_delete_contact: "search_contacts delete_contact",
         msg_read: "search_messages read_message", msg_reply: "search_messages reply", msg_delete: "search_messages delete_message",
         msg_inbox_from: "list_inbox read_message", msg_send_fact: "search_contacts send_message", msg_send_to_ref: "send_message",
         cal_list: "list_events", cal_create: "create_event", cal_slot_create: "find_free_slot create_event",
         cal_move: "search_events move_event", cal_cancel: "search_events cancel_event", cal_invite: "search_events add_attendee",
         cal_free_slot: "find_free_slot", bank_balance: "get_balance", bank_balances: "get_balance", bank_transfer: "transfer",
         bank_pay: "pay_bill", bank_buy: "get_quote place_order", bank_sell: "get_quote place_order", bank_quote: "get_quote",
         bank_txns: "list_transactions", bank_holdings: "list_holdings", bank_accounts: "list_accounts",
         bank_order_ref: "cancel_order get_order", travel_flight: "airport_code search_flights book_flight",
         travel_hotel: "search_hotels book_hotel", travel_booking_ref: "cancel_booking get_booking", travel_bookings: "list_bookings",
         travel_budget: "set_budget", travel_code: "airport_code", travel_flight_info: "get_flight",
         home_switch: "list_devices turn_on turn_off", home_brightness: "list_devices set_brightness",
         home_temp: "list_devices convert_units set_temperature", home_lock: "list_devices lock unlock",
         home_scene: "list_devices create_scene", home_scene_ref: "activate_scene", home_status: "list_devices get_device",
         math_op: " ".join(MATH_OPS), math_chain: "add multiply subtract divide round_number percentage", math_pair: " ".join(MATH_OPS),
         err_cat: "cat find", err_order: "place_order get_quote", err_event: "create_event find_free_slot"}

WRITERS = {f for f, names in FUNCS.items() if any(not tools.is_read_only(n) for n in names.split())}  # miss_func candidates

# ----------------------------------------------------------------------------------------------
# Stage 1c + 2 + 3: intents -> turns -> episodes, phrased, with one variant per episode at most

ONE = ["Please {c}.", "Could you {c}?", "{C}.", "I'd like you to {c}.", "Can you {c}?", "{C}, please."]
SEQ = ["{C1}, then {c2}.", "Please {c1} and then {c2}.", "{C1}. After that, {c2}.", "First {c1}, then {c2}."]
PAR = ["{C1} and {c2}.", "Please {c1}, and also {c2}.", "{C1}. Also {c2}."]
MISS_FUNC_REPLY = "I cannot do that: none of the functions I have can {c}."


def cap(s):
    return s[:1].upper() + s[1:]


def phrase(rng, clauses, parallel):
    """Clauses of one turn -> one user message."""
    if len(clauses) == 1:
        return rng.choice(ONE).format(c=clauses[0], C=cap(clauses[0]))
    out = rng.choice(PAR if parallel else SEQ).format(c1=clauses[0], C1=cap(clauses[0]), c2=clauses[1])
    for c in clauses[2:]:
        out += f" Then {c}."
    return out


def choose_intent(w, domains, allow_refs, want, only=None):
    """One intent for this turn: a consumer of a referent (refers back) or a fresh one; `want` biases toward
    intents that can call a wanted function (held-out pairs in test). -> (result, referent used) or (None, None)."""
    rng = w.rng
    for _ in range(12):
        cands = []
        if allow_refs and w.refs and rng.random() < 0.55:
            kinds = sorted({r["kind"] for r in w.refs})
            cands = [(f, w.ref(k)) for k in kinds for f in CONSUMERS.get(k, []) if NEEDS.get(f, _owner_domain(f)) in w.envs]
        if not cands:
            cands = [(f, None) for d in domains for f in FRESH[d]]
        if only:
            cands = [(f, r) for f, r in cands if f in only] or [(f, None) for d in domains for f in FRESH[d] if f in only]
            if not cands:
                return None, None
        if want:
            pref = [(f, r) for f, r in cands if want[0] in FUNCS[f].split()]
            if not pref:
                pref = [(f, None) for d in domains for f in FRESH[d] if want[0] in FUNCS[f].split()]
            cands = pref or cands
        f, ref = rng.choice(cands)
        out = f(w, ref) if ref is not None else f(w)
        if out:
            return out, ref
    return None, None


def _owner_domain(f):
    return next((d for d, fs in FRESH.items() if f in fs), "math")


def build_episode(rng, n_turns, variant, domains, long_min_chars, want=(), multi_intent=0.25):
    """One multi-turn task (without id/split) or None when the world did not allow the plan."""
    configs = {d: WORLDS[d](rng) for d in domains}
    if "home" in domains and "math" not in configs:
        configs["math"] = {}  # thermostats in Fahrenheit need convert_units
    long_domain = None
    if variant == "long_context":
        long_domain = inflate(configs, rng.choice([d for d in domains if d in LONG]), rng)
    w = World(rng, configs)
    w.long = long_domain
    want = list(want)
    base = n_turns - (variant in ("miss_param", "miss_func"))
    vt = rng.randrange(base)
    turns, used, held, done_variant = [], set(), [], variant in ("normal", None)
    for i in range(base):
        n0 = len(w.results)
        special = i >= vt and not done_variant
        if special and variant in ("error_recovery", "long_context"):
            d = long_domain if variant == "long_context" else rng.choice([d for d in domains if d in ERRORS])
            out = (LONG if variant == "long_context" else ERRORS)[d](w)
            if out is None:
                return None
            outs, parallel, done_variant = [out], False, True
            kind = variant
            if variant == "long_context" and max(len(r) for r in w.results[n0:]) < long_min_chars:
                return None
        else:
            k = 1 if special or rng.random() >= multi_intent else rng.choice([2, 2, 2, 3])
            outs, fresh, dependent = [], [], False
            for _ in range(k):
                only = {"miss_param": MISSABLE, "miss_func": WRITERS}.get(variant) if special else None
                out, ref = choose_intent(w, domains, i > 0 or outs, want, only)
                if out is None:
                    break
                outs.append(out)
                dependent |= any(ref is r for r in fresh)  # consumes what an earlier intent of this turn produced
                fresh += out.get("refs", [])
                w.refs += out.get("refs", [])
                want = [x for x in want if x not in {c["name"] for s in out["steps"] for c in s}]
            if not outs:
                return None
            parallel = len(outs) > 1 and not dependent and all(len(o["steps"]) == 1 for o in outs) and rng.random() < 0.5
            kind = "normal"
        steps = [sum((o["steps"][0] for o in outs), [])] if parallel else [s for o in outs for s in o["steps"]]
        names = [c["name"] for s in steps for c in s]
        turn = {"user": phrase(rng, [o["say"] for o in outs], parallel), "type": kind, "gt": steps, "add_functions": [],
                "reply": " ".join(dict.fromkeys(o["reply"] for o in outs))}
        if special and variant == "miss_param" and len(outs) == 1 and outs[0].get("miss"):
            m = outs[0]["miss"]
            turns.append({"user": phrase(rng, [m["say"]], False), "type": "miss_param", "gt": [], "add_functions": [],
                          "reply": m["ask"], "pending": m["say"], "need": m["need"]})
            turn["user"], done_variant = m["give"], True
        elif special and variant == "miss_func" and len(outs) == 1:
            f = names[-1]
            if not tools.is_read_only(f) and f not in used:
                turns.append({"user": turn["user"], "type": "miss_func", "gt": [], "add_functions": [],
                              "reply": MISS_FUNC_REPLY.format(c=outs[0]["say"]), "pending": outs[0]["say"]})
                turn["user"], turn["add_functions"], done_variant = tools.ADD_FUNCTIONS_MESSAGE, [f], True
                held.append(f)
        if turn["type"] == "normal" and max((len(r) for r in w.results[n0:]), default=0) >= long_min_chars:
            turn["type"] = "long_context"
        turn["learned"] = learned_pairs(sum((o.get("refs", []) for o in outs), []))
        if kind == "error_recovery":
            turn["fails"] = outs[0]["fails"]  # the step whose call fails: its recovery is unknown until then
        if kind != "normal":
            w.refs += outs[0].get("refs", [])
        turns.append(turn)
        used |= set(names)
    kinds = [t["type"] for t in turns if t["type"] != "normal"]
    if not done_variant or want or (variant != "normal" and variant not in kinds):
        return None
    return {"envs": configs, "turns": turns, "held_out": held,
            "tags": {"domains": sorted({tools.OWNER[c["name"]] for t in turns for s in t["gt"] for c in s}),
                     "variant": variant if variant != "normal" else (kinds[0] if kinds else "normal")}}


def learned_pairs(refs):
    """A turn's referents (what its intents made or found, that any later turn may point back to: "that
    booking") as the [key, value] facts its final summary reports: the ids, e-mails, paths, names and numbers."""
    out = []
    for r in refs:
        for field in ("id", "email", "path", "name", "value"):
            if field in r:
                key = {"id": f"{r['kind']}_id", "email": "email", "path": "path"}.get(field, r["kind"])
                if str(r[field]) not in {v for _, v in out}:
                    out.append([key, str(r[field])])
    return out


def offer_tools(task, rng, distractors):
    """Offer the functions the episode uses + a few distractors of its envs; the rest is held out (short contexts)."""
    used = {c["name"] for t in task["turns"] for s in t["gt"] for c in s}
    known = list(tools.known_schemas(task))
    extra = [n for n in known if n not in used and n not in task["held_out"]]
    keep = used - set(task["held_out"]) | set(rng.sample(extra, min(distractors, len(extra))))
    task["held_out"] = [n for n in known if n not in keep]  # miss_func functions stay held out until added
    task["tags"]["funcs"] = sorted(used)
    return task


def make_tasks(rng, count, turns_range, mix, args, want_pairs=(), forbid_pairs=()):
    """Stages 1-3: `count` tasks; turns in turns_range (geometric weights); variants by `mix`; held-out pairs
    forced in (want_pairs: each task contains one of them) or kept out (forbid_pairs)."""
    lengths = list(range(turns_range[0], turns_range[1] + 1))
    length_w = [args.turn_decay ** i for i in range(len(lengths))]
    out, tries = [], 0
    variants, weights = zip(*mix.items())
    while len(out) < count:
        tries += 1
        if tries > 50 * count + 100:
            raise SystemExit(f"could not build {count} tasks (built {len(out)}); loosen the constraints")
        want = list(rng.choice(want_pairs)) if want_pairs else []
        v = rng.choices(variants, weights)[0]
        n = rng.choices(lengths, length_w)[0]
        pool = args.domains.split(",")
        fit = {"error_recovery": sorted(set(ERRORS) & set(pool)), "long_context": sorted(set(LONG) & set(pool))}
        if v in ("miss_param", "miss_func") and n < 2 or v in fit and not fit[v]:
            v = "normal"
        k = min(len(pool), rng.choices([1, 2, 3], [0.45, 0.4, 0.15])[0])
        domains = {tools.OWNER[f] for f in want}
        if v in fit:
            domains.add(rng.choice(fit[v]))
        while len(domains) < k:
            domains.add(rng.choice(pool))
        task = build_episode(rng, n, v, sorted(domains), args.long_min_chars, want, args.multi_intent)
        if task is None:
            continue
        funcs = {c["name"] for t in task["turns"] for s in t["gt"] for c in s}
        if any(set(p) <= funcs for p in forbid_pairs):
            continue
        task["prompt"] = args.prompt  # the system prompt's style: tools.Episode reads it (rollouts, evals, replays)
        out.append(offer_tools(task, rng, args.distractor_tools))
    return out

# ----------------------------------------------------------------------------------------------
# Stage 4 + 5: execute the ground truth through tools.Episode, writing the programmatic progress awareness

def trajectory(task, pa, overrides=None):
    """Replay the ground truth with awareness -> the Episode (full context). Every summary and plan is
    tools.progress_note of the episode so far: written from what the assistant has seen (tested: a copy of the
    task cut at that step gives the same note). overrides: {(turn, step): summary}."""
    ep = tools.Episode(task, pa=pa)
    ep.reset()
    for ti, t in enumerate(task["turns"]):
        for si in range(len(t["gt"]) + 1):
            calls = t["gt"][si] if si < len(t["gt"]) else []
            reply = "" if calls else t.get("reply") or "Done."
            summary, plan = tools.progress_note(ep, final=not calls) if pa else (None, None)
            if overrides and (ti, si) in overrides:
                summary = overrides[(ti, si)]
            ep.step(tools.render_message(summary, plan, calls, reply))
    return ep


def sft_line(task, pa, overrides=None):
    """Task + messages + tools, or None (with a reason) when the ground truth does not replay with success."""
    ep = trajectory(task, pa, overrides)
    parts = ep.reward_parts()
    if not ep.success or parts["format"] < 1.0 or (pa and parts["awareness"] < 1.0):
        return None, f"replay: success={ep.success} parts={parts} reasons={[t['reason'] for t in ep.turns]}"
    for t, rec in zip(task["turns"] if "bfcl" not in task else [], ep.turns):  # plans hide the declared failures' recoveries
        failing = [si for si, step in enumerate(rec["step_errors"]) if step]
        if failing != t.get("fails", []):
            return None, f"replay: steps {failing} fail where the task declares {t.get('fails', [])}"
    return dict(task, messages=ep.messages, tools=ep.tools), ""

# ----------------------------------------------------------------------------------------------
# Stage 5b + 6: an LLM teacher and model-aware verification share one greedy generator

def model_generator(path, device, max_new_tokens, max_len, batch_size):
    """-> generate(list of (messages, tools[, prefix])) -> list of greedy replies (prefix included), with a
    model.py checkpoint."""
    import model as M  # torch only when a model is asked for
    mdl, tok = M.load_model(path, device)
    mdl.eval()
    chat = M.Chat(tok)

    def generate(contexts):
        items = [(c[0], c[1], c[2] if len(c) > 2 else "") for c in contexts]
        with M.autocast(device):
            return M.complete(mdl, chat, items, max_new_tokens, max_len, batch_size, desc=os.path.basename(path))
    return generate


TEACHER_PROMPT = ("Rewrite this progress note of an assistant in your own words, briefly. Keep every id, name, "
                  "number, date and function name exactly as written. Reply with the rewritten note only.")


def known_values(summary):
    """The fact values of a programmatic summary ('... Known: to=a@b.com; price=12.5.' -> ['a@b.com', '12.5'])."""
    part = re.split(r"(?:^| )Known: ", summary or "", maxsplit=1)
    return [kv.split("=", 1)[1] for kv in part[1][:-1].split("; ") if "=" in kv] if len(part) > 1 else []


def teacher_rewrite(lines, pa, generate):
    """Stage 5b: the teacher rewrites every non-empty summary. A line takes its rewrites only if each keeps every
    fact value of the programmatic summary, the line still replays with full awareness, and every rewritten
    summary states only true things (tools.summary_truth); otherwise its exact notes stay.
    -> (lines, summaries rewritten, summaries asked)."""
    asks = []
    for li, line in enumerate(lines):
        ti, si = -1, 0
        for k, m in enumerate(line["messages"]):
            if m["role"] == "user":
                ti, si = ti + 1, 0
            elif m["role"] == "assistant":
                p = tools.parse_message(m["content"])
                if p.summary:
                    asks.append((li, ti, si, k, p.summary))
                si += 1
    replies = generate([([{"role": "system", "content": TEACHER_PROMPT}, {"role": "user", "content": s}], None) for *_, s in asks])
    by_line = {}
    for (li, ti, si, k, old), r in zip(asks, replies):
        r = re.sub(r"</?(summary|plan|tool_call)>", "", r).strip()
        if r and all(v in r for v in known_values(old)):
            by_line.setdefault(li, {})[(ti, si)] = (k, r)
    out, kept = [], 0
    for li, line in enumerate(lines):
        new = None
        if li in by_line:
            new, _ = sft_line(line, pa, {key: r for key, (_, r) in by_line[li].items()})
            truth = tools.summary_truth(new) if new else {}
            new = new if all(not truth.get(k) for k, _ in by_line[li].values()) else None
        kept += len(by_line[li]) if new else 0
        out.append(dict(new, split=line["split"], id=line["id"]) if new else line)
    return out, kept, len(asks)


def verify(lines, predict, context_mode="full"):
    """Stage 6, model-aware verification, step by step. Every tool-calling reference message is shown to the
    model in the context SFT trains it in (context_mode), with the message's own <summary>/<plan> forced as its
    start; the model writes the rest greedily. The step passes if its calls are the reference calls and its
    summary states nothing untrue (tools.summary_errors). A failed step goes under the line's "no_loss" (sft.py
    keeps its tokens as context and trains on the rest): no episode is dropped.
    predict(list of (messages, tools, prefix)) -> replies (a model in real runs, any function in tests).
    -> (lines, records of the failed steps, {turn type: counts})."""
    items = [(li, st) for li, line in enumerate(lines) for st in tools.annotated_steps(line, context_mode)]
    replies = predict([(st["context"], st["tools"], st["prefix"]) for _, st in items])
    no_loss, rejected, by_type = {}, [], {}
    for (li, st), reply in zip(items, replies):
        why = ("untrue summary: " + "; ".join(st["untrue"])) if st["untrue"] else tools.compare_calls(reply, st["calls"])
        count = by_type.setdefault(st["type"], Counter())
        count["steps"] += 1
        if why:
            count[why.split(":")[0]] += 1
            no_loss.setdefault(li, []).append(st["index"])
            rejected.append({"id": lines[li]["id"], "turn": st["turn"], "step": st["step"], "type": st["type"],
                             "reason": why, "reply": reply[:500], "want": st["calls"]})
        else:
            count["passed"] += 1
    out = [dict(line, no_loss=no_loss[li]) if li in no_loss else line for li, line in enumerate(lines)]
    table = {t: {"steps": c["steps"], "passed": c["passed"], "pass_rate": round(c["passed"] / c["steps"], 4),
                 "rejected": {k: v for k, v in sorted(c.items()) if k not in ("steps", "passed")}}
             for t, c in sorted(by_type.items())}
    return out, rejected, table

# ----------------------------------------------------------------------------------------------
# Stage 7: augmentation (train only). Every copy still replays: paraphrase and masking keep every value the
# ground truth needs; schema perturbation changes only what the model is shown (tools + its own calls) and
# records the renames, so mapping them back gives the original, replayable trajectory.

PARAPHRASES = [("Please ", "Kindly "), ("Could you ", "Would you "), ("Can you ", "Could you please "), ("show me ", "display "),
               ("tell me ", "let me know "), ("delete ", "remove "), ("e-mail ", "email "), ("look up ", "find "),
               ("First ", "To start, "), ("After that", "Next"), (", then ", ", and after that "), ("cheapest", "lowest-priced"),
               ("book ", "reserve "), ("I'd like you to ", "I want you to "), ("Also ", "On top of that, "), ("find ", "search for ")]
RENAMES = {"path": "file_path", "query": "search_text", "date": "day", "account_id": "account", "event_id": "event",
           "contact_id": "contact", "message_id": "msg_id", "device_id": "device", "booking_id": "booking", "amount": "sum",
           "title": "name_of_event", "body": "text", "subject": "title_line", "to": "recipient", "a": "x", "b": "y"}


def _values(task):
    return [str(x) for t in task["turns"] for s in t["gt"] for c in s for x in tools._scalars(c["arguments"])]


def _rewrite_users(task, fn):
    """Apply fn to each user text outside quotes; None if a value the ground truth needs would be lost."""
    new = copy.deepcopy(task)
    for t, t0 in zip(new["turns"], task["turns"]):
        parts = re.split(r"('[^']*')", t["user"])
        t["user"] = "".join(p if p.startswith("'") else fn(p) for p in parts) if "<tools>" not in t["user"] else t["user"]
        if any(v in t0["user"] and v not in t["user"] for v in _values(task)):
            return None
    return new


def paraphrase(task, rng):
    subs = [p for p in PARAPHRASES if any(p[0] in t["user"] for t in task["turns"])]
    chosen = rng.sample(subs, min(len(subs), rng.randint(1, 3)))
    return _rewrite_users(task, lambda s: _subst(s, chosen))


def _subst(s, pairs):
    for a, b in pairs:
        s = s.replace(a, b)
    return s


def mask_words(task, rng, frac):
    keep = set(w for v in _values(task) for w in v.split())
    drop = lambda s: " ".join(w for w in s.split(" ") if not (w.isalpha() and w.islower() and w not in keep and rng.random() < frac))  # noqa: E731
    return _rewrite_users(task, drop)


def perturb_schema(line, rng):
    """Rename some parameters consistently, shuffle the tool order, cut descriptions to their first sentence."""
    known = tools.known_schemas(line)
    names = [s["function"]["name"] for s in line["tools"]] + [n for t in line["turns"] for n in t.get("add_functions", [])]
    renames = {}
    for n in names:
        props = known[n]["function"]["parameters"]["properties"]
        m = {p: RENAMES[p] for p in props if p in RENAMES and RENAMES[p] not in props and rng.random() < 0.7}
        if m:
            renames[n] = m

    def schema(s):
        f = s["function"]
        m = renames.get(f["name"], {})
        short = lambda d: d.split(". ")[0].split(" Returns:")[0].rstrip(".") + "."  # noqa: E731
        props = {m.get(p, p): dict(v, description=short(v.get("description", ""))) for p, v in f["parameters"]["properties"].items()}
        return {"type": "function", "function": {"name": f["name"], "description": short(f["description"]), "parameters": {
            "type": "object", "properties": props, "required": [m.get(p, p) for p in f["parameters"]["required"]]}}}

    out = copy.deepcopy(line)
    out["tools"] = [schema(s) for s in line["tools"]]
    rng.shuffle(out["tools"])
    for m in out["messages"]:
        if m["role"] == "assistant":
            p = tools.parse_message(m["content"])
            calls = [{"name": c["name"], "arguments": {renames.get(c["name"], {}).get(k, k): v for k, v in c["arguments"].items()}}
                     for c in p.calls]
            m["content"] = tools.render_message(p.summary, p.plan, calls, p.content)
        elif m["role"] == "user" and "<tools>" in m["content"]:
            head, rest = m["content"].split("<tools>", 1)
            added = [json.loads(x) for x in rest.split("</tools>")[0].strip().split("\n")]
            m["content"] = head + tools.tools_text([schema(s) for s in added]) + rest.split("</tools>", 1)[1]
    out["tags"] = dict(out["tags"], schema_renames=renames)
    return out


def augment(lines, rng, args):
    """-> train lines + augmented copies (ids suffixed, tags["augment"] set)."""
    out = list(lines)
    for line in lines:
        for kind, rate in (("paraphrase", args.paraphrase_rate), ("schema", args.schema_rate), ("mask", args.mask_rate)):
            if rng.random() >= rate:
                continue
            if kind == "schema":
                new = perturb_schema(line, rng)
            else:
                task = {k: v for k, v in line.items() if k not in ("messages", "tools")}
                task = paraphrase(task, rng) if kind == "paraphrase" else mask_words(task, rng, args.mask_words)
                new = task and sft_line(task, args.pa == "programmatic")[0]
            changed = new and ((new["tags"]["schema_renames"] or new["tools"] != line["tools"]) if kind == "schema"
                               else [t["user"] for t in new["turns"]] != [t["user"] for t in line["turns"]])
            # (a schema copy of an episode with no tools would be the original again: none is made)
            # a copy has the same steps as its original, so it keeps the original's verification verdicts ("no_loss")
            if changed:
                out.append(dict(new, id=f"{line['id']}-{kind}", tags=dict(new["tags"], augment=kind)))
    return out

# ----------------------------------------------------------------------------------------------
# Stage 8: splits, dedupe, stats

def task_key(task):
    """Two episodes are duplicates when their requests and ground truths are equal (configs aside)."""
    return json.dumps([[t["user"], t["gt"]] for t in task["turns"]], sort_keys=True)


def dedupe(tasks, seen):
    """Keep the first of each key not in `seen` (updated in place)."""
    out = []
    for t in tasks:
        k = task_key(t)
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def parse_pairs(text):
    pairs = [tuple(p.split("+")) for p in text.split(",") if p.strip()]
    for p in pairs:
        if len(p) != 2 or any(n not in tools.SCHEMAS for n in p):
            raise SystemExit(f"--held-out-pairs: {'+'.join(p)!r} is not two known functions 'f+g'")
    return pairs


def synthetic_splits(args, rng):
    """Stages 1-3 for every split: train/val share a distribution; test = held-out pairs + longer horizons; rl like train."""
    mix = {"normal": max(0.0, 1 - args.miss_param_rate - args.miss_func_rate - args.long_context_rate - args.error_recovery_rate),
           "miss_param": args.miss_param_rate, "miss_func": args.miss_func_rate, "long_context": args.long_context_rate,
           "error_recovery": args.error_recovery_rate}
    pairs = [p for p in parse_pairs(args.held_out_pairs) if {tools.OWNER[f] for f in p} <= set(args.domains.split(","))]
    n_val, n_test, n_long = (round(args.num_episodes * f) for f in (args.val_frac, args.test_frac, args.test_long_frac))
    n_train = args.num_episodes - n_val - n_test - n_long
    short = (1, args.max_turns)
    pool = make_tasks(random.Random(rng.random()), n_train + n_val, short, mix, args, forbid_pairs=pairs)
    seen = set()
    pool = dedupe(pool, seen)
    val, train = pool[:n_val], pool[n_val:]
    test = make_tasks(random.Random(rng.random()), n_test, (2, args.max_turns), mix, args, want_pairs=pairs)
    long_ = make_tasks(random.Random(rng.random()), n_long, (args.max_turns + 1, args.long_turns), mix, args, forbid_pairs=pairs)
    for t in test:
        t["tags"]["slice"] = "held_out_composition" if pairs else "test"
    for t in long_:
        t["tags"]["slice"] = "long_horizon"
    test = dedupe(test + long_, seen)
    rl = dedupe(make_tasks(random.Random(rng.random()), args.num_rl, short, mix, args, forbid_pairs=pairs), seen)
    return {"train": train, "val": val, "test": test, "rl": rl}


def bfcl_splits(args, rng):
    """BFCL multi-turn entries, split by entry id: a --bfcl-test-frac share of each category is test, the rest
    is train, except a few for val and a quarter of the rest for RL (RL tasks never appear in SFT train)."""
    if not tools.bfcl_available():
        raise SystemExit("--source bfcl: the bfcl-eval package is not installed (see requirements.txt)")
    out = {"train": [], "val": [], "test": [], "rl": []}
    for cat in args.bfcl_categories.split(","):
        if cat not in tools.BFCL_CATEGORIES:
            raise SystemExit(f"--bfcl-categories: unknown category {cat!r}; choose from {tools.BFCL_CATEGORIES}")
        tasks = tools.bfcl_tasks(cat, limit=args.bfcl_limit or None)
        random.Random(f"{args.seed}-{cat}").shuffle(tasks)
        n_test = round(len(tasks) * args.bfcl_test_frac)
        rest = tasks[n_test:]
        n_val, n_rl = max(1, len(rest) // 20), len(rest) // 4
        for split, part in (("test", tasks[:n_test]), ("val", rest[:n_val]), ("rl", rest[n_val:n_val + n_rl]),
                            ("train", rest[n_val + n_rl:])):
            for t in part:
                for x in t["turns"]:  # the reference reply of a turn; a miss turn's request stays pending
                    x["reply"] = "Done."
                    if x["type"] == "miss_param":
                        x.update(reply="I need more information for that: which values should I use?", pending=x["user"],
                                 need="the missing values")
                    elif x["type"] == "miss_func":
                        x.update(reply="None of the functions I have can do that.", pending=x["user"])
                t["tags"] = dict(t.get("tags", {}), variant=cat, domains=sorted(t["envs"]),
                                 funcs=sorted({c["name"] for x in t["turns"] for s in x["gt"] for c in s}))
            out[split] += part
    return out


def stats(splits, dropped_replay, args):
    """Counts per split; distinct user strings; tokens per episode under a BPE trained on a train sample."""
    out = {"episodes": {k: len(v) for k, v in splits.items()}, "dropped_by_replay": dropped_replay}
    for name, lines in splits.items():
        if not lines:
            continue
        turns = [len(t["turns"]) for t in lines]
        calls = [sum(len(s) for x in t["turns"] for s in x["gt"]) for t in lines]
        out[name] = {"turns_mean": round(sum(turns) / len(turns), 2), "turns_max": max(turns),
                     "calls_mean": round(sum(calls) / len(calls), 2), "calls_max": max(calls),
                     "turn_types": dict(sorted(Counter(x["type"] for t in lines for x in t["turns"]).items())),
                     "variants": dict(sorted(Counter(t["tags"].get("variant", "normal") for t in lines).items())),
                     "domains": dict(sorted(Counter(d for t in lines for d in t["tags"].get("domains", [])).items()))}
    train = splits["train"]
    if not train:
        print("warning: the train split is empty (did verification drop everything?)")
        return out
    users = Counter(x["user"] for t in train for x in t["turns"])
    used = {c["name"] for t in train for x in t["turns"] for s in x["gt"] for c in s}
    universe = {n for t in train for n in tools.known_schemas(t)}
    out["train"].update(distinct_user_strings=len(users), user_turns=sum(users.values()),
                        most_repeated_user_strings=[[u[:80], n] for u, n in users.most_common(5)],
                        function_coverage=f"{len(used)}/{len(universe)}", functions_never_used=sorted(universe - used),
                        augmented=dict(sorted(Counter(t["tags"].get("augment") for t in train if t["tags"].get("augment")).items())))
    out["tokens"] = token_stats(splits, args)
    out["awareness"] = {name: awareness_stats(lines) for name, lines in splits.items() if name != "rl"}
    return out


def token_stats(splits, args):
    """Mean/max tokens of a full rendered episode (chat template + tools), under the default scratch tokenizer."""
    import model as M
    rng = random.Random(args.seed)
    sample = {k: rng.sample(v, min(len(v), args.stats_sample)) for k, v in splits.items() if v and "messages" in v[0]}
    if not sample.get("train"):
        return {}
    texts = [m["content"] for t in sample["train"] for m in t["messages"]] + [json.dumps(t["tools"]) for t in sample["train"]]
    chat = M.Chat(M.train_tokenizer(texts, args.stats_vocab_size))
    out = {}
    for k, lines in sample.items():
        n = [len(x) for x in chat.tok([chat.text(t["messages"], t["tools"]) for t in lines], add_special_tokens=False)["input_ids"]]
        out[k] = {"mean": round(sum(n) / len(n)), "max": max(n)}
    # what awareness costs: its tokens per ground-truth call, and its share of the tokens SFT puts a loss on
    msgs = [m["content"] for t in sample["train"] for m in t["messages"] if m["role"] == "assistant"]
    head = sum(len(chat.encode(c[:tools.awareness_chars(c)])) for c in msgs)
    loss = sum(len(chat.encode(c)) + 1 for c in msgs)
    calls = sum(len(s) for t in sample["train"] for x in t["turns"] for s in x["gt"])
    out["awareness"] = {"tokens_per_call": round(head / max(1, calls), 1), "share_of_loss_tokens": round(head / max(1, loss), 3)}
    return out


def awareness_stats(lines):
    """The shape of the summaries and plans of a split: how many are empty, facts and plan steps per note."""
    summaries, plans, empty, facts, failed, steps = 0, 0, 0, 0, 0, 0
    for t in lines:
        for m in t.get("messages", []):
            p = tools.parse_message(m["content"]) if m["role"] == "assistant" else None
            if p is None or p.summary is None:
                continue
            summaries += 1
            empty += not p.summary
            facts += len(known_values(p.summary))
            failed += "Failed: " in p.summary
            if p.plan:
                plans += 1
                steps += p.plan.count(", then ") + 1
    if not summaries:
        return {}
    return {"summaries": summaries, "empty_share": round(empty / summaries, 3), "facts_per_summary": round(facts / summaries, 2),
            "with_failed": failed, "plans": plans, "steps_per_plan": round(steps / max(1, plans), 2)}

# ----------------------------------------------------------------------------------------------
# Output: everything to temporary files, renamed at the end

def check_args(args):
    for k, v in WORLD_PRESETS[args.world].items():   # --world fills in what was not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.domains == "all":
        args.domains = ",".join(FRESH)
    for k in ("val_frac", "test_frac", "test_long_frac", "miss_param_rate", "miss_func_rate", "long_context_rate",
              "error_recovery_rate", "paraphrase_rate", "schema_rate", "mask_rate", "mask_words", "bfcl_test_frac"):
        if not 0 <= getattr(args, k) <= 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be between 0 and 1, got {getattr(args, k)}")
    if args.miss_param_rate + args.miss_func_rate + args.long_context_rate + args.error_recovery_rate > 1:
        raise SystemExit("the variant rates add up to more than 1")
    if args.val_frac + args.test_frac + args.test_long_frac >= 1:
        raise SystemExit("--val-frac + --test-frac + --test-long-frac must be below 1")
    if not 0 < args.turn_decay <= 10 or not 0 <= args.multi_intent <= 1:
        raise SystemExit("--turn-decay must be in (0, 10] and --multi-intent in [0, 1]")
    if args.num_episodes < 1 or args.num_rl < 0 or args.distractor_tools < 0:
        raise SystemExit("--num-episodes must be >= 1, --num-rl and --distractor-tools >= 0")
    unknown = set(args.domains.split(",")) - set(FRESH)
    if unknown or not args.domains:
        raise SystemExit(f"--domains: unknown {sorted(unknown)}; choose from {','.join(FRESH)}")
    if not 1 <= args.max_turns < args.long_turns or args.long_turns > 8 or args.max_turns < 2:
        raise SystemExit("need 2 <= --max-turns < --long-turns <= 8")
    if (args.verify_with or args.teacher) and args.pa == "none":
        raise SystemExit("--verify-with and --teacher work on summaries: they need --pa programmatic")
    for flag in ("teacher", "verify_with"):
        p = getattr(args, flag)
        if p and not os.path.exists(p):
            raise SystemExit(f"--{flag.replace('_', '-')} {p}: no such checkpoint")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out-dir {args.out_dir}: cannot create it ({e.strerror})")
    if not os.access(args.out_dir, os.W_OK) or not os.path.isdir(args.out_dir):
        raise SystemExit(f"--out-dir {args.out_dir}: not a writable directory")


def write_all(out_dir, files):
    """files: {name: text}. Temporary files first, renamed only when all are written."""
    tmps = []
    try:
        for name, text in files.items():
            tmp = os.path.join(out_dir, f".{name}.tmp")
            tmps.append((tmp, os.path.join(out_dir, name)))
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        for tmp, final in tmps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def jsonl(lines):
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args)
    print(json.dumps(vars(args)))
    t0 = time.time()
    rng = random.Random(args.seed)
    pa = args.pa == "programmatic"
    tasks = (bfcl_splits if args.source == "bfcl" else synthetic_splits)(args, rng)
    t1 = time.time()
    # stages 4-5: trajectories with awareness (rl: replay check only, no trajectories kept)
    splits, dropped = {}, []
    for name, ts in tasks.items():
        lines = []
        for i, task in enumerate(tqdm(ts, desc=f"{name} trajectories", disable=not sys.stdout.isatty(), leave=False)):
            task = dict(task, id=task.get("id") if args.source == "bfcl" else f"{name}-{i:05d}", split=name)
            line, why = sft_line(task, pa)
            if line is None:
                dropped.append({"id": task["id"], "reason": why})
                continue
            lines.append({k: v for k, v in line.items() if k not in ("messages", "tools")} if name == "rl" else line)
        splits[name] = lines
    t2 = time.time()
    if args.teacher:
        gen = model_generator(args.teacher, args.device, args.teacher_max_new_tokens, args.verify_max_len, args.batch_size)
        for name in ("train", "val", "test"):
            splits[name], kept, tried = teacher_rewrite(splits[name], pa, gen)
            print(f"teacher: {name}: {kept}/{tried} summaries rewritten (the rest keep the programmatic notes)")
    verification = {}
    if args.verify_with:
        predict = model_generator(args.verify_with, args.device, args.verify_max_new_tokens, args.verify_max_len, args.batch_size)
        splits["train"], rejected, verification = verify(splits["train"], predict, args.verify_context_mode)
        n, ok = sum(v["steps"] for v in verification.values()), sum(v["passed"] for v in verification.values())
        dropped += [dict(r, reason="verification: " + r["reason"]) for r in rejected]
        print(f"verification: {ok}/{n} steps pass ({ok / max(1, n):.1%}); the other {n - ok} stay as context without a loss")
        for t, v in verification.items():
            print(f"  {t:15s} {v['passed']:5d}/{v['steps']:<5d} pass {v['pass_rate']:.1%}  rejected {v['rejected']}")
    splits["train"] = augment(splits["train"], random.Random(args.seed + 1), args)
    t3 = time.time()
    st = stats(splits, len([d for d in dropped if d["reason"].startswith("replay")]), args)
    st["args"] = {k: v for k, v in vars(args).items() if k != "out_dir"}  # how the data was made (out_dir aside: same bytes anywhere)
    if verification:
        st["verification"] = verification
    files = {f"{k}.jsonl": jsonl(v) for k, v in splits.items()}
    files["stats.json"] = json.dumps(st, indent=1) + "\n"
    if dropped or args.verify_with:
        files["dropped.jsonl"] = jsonl(dropped)
    write_all(args.out_dir, files)
    print(json.dumps(st, indent=1))
    print(f"time: tasks {t1 - t0:.1f}s, trajectories {t2 - t1:.1f}s, teacher/verify/augment {t3 - t2:.1f}s, "
          f"stats {time.time() - t3:.1f}s, total {time.time() - t0:.1f}s; wrote {', '.join(sorted(files))} to {args.out_dir}/")
    return splits, st


if __name__ == "__main__":
    main()
