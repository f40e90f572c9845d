"""gen_data.py: determinism, replay of every trajectory, summaries carry the facts, variant shapes, no split
leakage, causal awareness (cut at any step, the same note), true summaries, verification step by step, augmentation
stays replayable, bad args leave nothing behind."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gen_data as G  # noqa: E402
import tools  # noqa: E402

SMALL = ["--num-episodes", "240", "--num-rl", "40", "--stats-sample", "30", "--stats-vocab-size", "400",
         "--miss-param-rate", "0.15", "--miss-func-rate", "0.15", "--long-context-rate", "0.1", "--error-recovery-rate", "0.15",
         "--paraphrase-rate", "0.2", "--schema-rate", "0.2", "--mask-rate", "0.2"]


def read(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    G.main(SMALL + ["--out-dir", str(out)])
    return {k: read(out / f"{k}.jsonl") for k in ("train", "val", "test", "rl")}, out


def funcs(task):
    return {c["name"] for t in task["turns"] for s in t["gt"] for c in s}


def unrename(line):
    """Map a schema-perturbed line's calls back to the real parameter names."""
    back = {f: {v: k for k, v in m.items()} for f, m in line["tags"].get("schema_renames", {}).items()}
    out = []
    for m in line["messages"]:
        if m["role"] == "assistant" and back:
            p = tools.parse_message(m["content"])
            calls = [{"name": c["name"], "arguments": {back.get(c["name"], {}).get(k, k): v for k, v in c["arguments"].items()}}
                     for c in p.calls]
            m = dict(m, content=tools.render_message(p.summary, p.plan, calls, p.content))
        out.append(m)
    return out


def feed(line, messages=None):
    """Drive a fresh Episode with the reference assistant messages."""
    ep = tools.Episode(line, pa="<summary>" in line["messages"][0]["content"])
    ep.reset()
    for m in messages or line["messages"]:
        if m["role"] == "assistant":
            ep.step(m["content"])
    return ep


def test_same_seed_same_bytes_and_seed_matters(tmp_path):
    args = ["--num-episodes", "40", "--num-rl", "8", "--stats-sample", "10", "--stats-vocab-size", "300"]
    for d, hash_seed in (("a", "1"), ("b", "2")):  # separate processes, different str hashing: no set-order leaks
        p = subprocess.run([sys.executable, os.path.join(ROOT, "gen_data.py"), *args, "--out-dir", str(tmp_path / d)],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        assert p.returncode == 0, p.stderr
    G.main(args + ["--out-dir", str(tmp_path / "c"), "--seed", "1"])
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["rl.jsonl", "stats.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_every_reference_trajectory_replays_with_full_reward(data):
    splits, _ = data
    n = 0
    for name in ("train", "val", "test"):
        for line in splits[name]:
            ep = feed(line, unrename(line))
            parts = ep.reward_parts()
            assert ep.success and parts["format"] == parts["turns"] == parts["success"] == 1.0, (line["id"], parts)
            assert parts["awareness"] == 1.0 and parts["efficiency"] == 1.0, (line["id"], parts)
            # the messages are exactly what the Episode shows (schema copies: up to the recorded renames)
            same = lambda m: m["role"] != "user" or "<tools>" not in m["content"] or "schema_renames" not in line["tags"]  # noqa: E731
            assert [m["content"] for m in ep.messages if same(m)] == [m["content"] for m in unrename(line) if same(m)], line["id"]
            n += 1
    for line in splits["rl"]:  # RL tasks: no trajectories, but the ground truth replays
        assert "messages" not in line and "tools" not in line
        assert tools.replay(line, tools.ground_truth_calls(line)).success
    assert n > 200


def notes(task):
    """{(turn, step): (summary, plan)} of the reference trajectory gen_data writes for a task."""
    ep = G.trajectory({k: v for k, v in task.items() if k not in ("messages", "tools", "no_loss")}, True)
    out, ti, si = {}, -1, 0
    for m in ep.messages:
        if m["role"] == "user":
            ti, si = ti + 1, 0
        elif m["role"] == "assistant":
            p = tools.parse_message(m["content"])
            out[(ti, si)] = (p.summary, p.plan)
            si += 1
    return out


def cut(task, ti, si):
    """The task as the assistant knows it when it writes step si of turn ti: no later turns; the current turn's
    reply unknown unless this is it; and before the turn's expected failure, no recovery steps."""
    t = copy.deepcopy({k: v for k, v in task.items() if k not in ("messages", "tools", "no_loss")})
    t["turns"] = t["turns"][:ti + 1]
    cur = t["turns"][ti]
    n = len(cur["gt"])
    if cur.get("fails") and not any(f < si for f in cur["fails"]):
        cur["gt"] = cur["gt"][:min(cur["fails"]) + 1]
    if si < n:
        cur["reply"] = "(not written yet)"
    return t


def test_awareness_is_causal(data):
    # the mechanical proof: every summary and plan is the same when the task is cut at that step, so it is a
    # function of what the assistant has seen (and of the request it is working on) only
    splits, _ = data
    checked, recover = 0, 0
    for line in [t for t in splits["train"] + splits["test"] if not t["tags"].get("augment")]:
        full = notes(line)
        for (ti, si), note in full.items():
            assert notes(cut(line, ti, si))[(ti, si)] == note, (line["id"], ti, si, note)
            checked += 1
            recover += bool(line["turns"][ti].get("fails"))
    assert checked > 500 and recover > 20


def test_the_plan_is_remade_after_an_error(data):
    # before the error the plan ends at the failing call; after it the plan names the recovery, and the summary
    # says what failed (with the error) instead of listing it as done
    splits, _ = data
    seen = 0
    for line in splits["train"] + splits["val"] + splits["test"]:
        if line["tags"].get("augment"):
            continue
        full = notes(line)
        for ti, t in enumerate(line["turns"]):
            if not t.get("fails"):
                continue
            f = t["fails"][0]
            names = lambda steps: ", then ".join(" and ".join(c["name"] for c in s) for s in steps)  # noqa: E731
            assert full[(ti, 0)][1] == f"Next: {names(t['gt'][:f + 1])}.", (line["id"], full[(ti, 0)])
            summary, plan = full[(ti, f + 1)]
            assert plan == f"Next: {names(t['gt'][f + 1:])}." and "Failed: " + t["gt"][f][0]["name"] + " (" in summary
            assert "Done: " not in summary or t["gt"][f][0]["name"] not in summary.split("Done: ")[1].split(".")[0]
            seen += 1
    assert seen >= 10


def test_known_facts_are_in_view_and_not_in_the_request(data):
    # a "Known:" value at a call step is in the assistant's view in both context modes (this turn's tool results
    # or the summary carried from the last turn), and the current request does not state it already
    splits, _ = data
    facts = 0
    for line in splits["train"] + splits["test"]:
        if line["tags"].get("augment"):
            continue
        carried, view, request, last, ti = "", [], "", "", -1
        for m in line["messages"][1:]:
            if m["role"] == "user":
                ti += 1
                carried, view, request = last, [], m["content"] + " " + (line["turns"][ti - 1].get("pending", "") if ti else "")
            elif m["role"] == "tool":
                view.append(m["content"])
            else:
                p = tools.parse_message(m["content"])
                for v in G.known_values(p.summary) if p.calls else []:
                    assert any(tools.has_word(x, v) for x in view + [carried]), (line["id"], v, p.summary)
                    assert not tools.has_word(request, v), (line["id"], v, request)
                    facts += 1
                last = p.summary
    assert facts > 100


def test_every_summary_is_true(data):
    splits, _ = data
    for line in splits["train"] + splits["val"] + splits["test"]:
        if "schema_renames" not in line["tags"]:
            assert not any(tools.summary_truth(line).values()), (line["id"], tools.summary_truth(line))
    # and the check bites: a made-up value, a failed call listed as done, a call that did not fail listed as failed
    line = next(t for t in splits["train"] if any(x.get("fails") for x in t["turns"]) and not t["tags"].get("augment"))
    k, m = next((k, m) for k, m in enumerate(line["messages"]) if m["role"] == "assistant" and "Failed: " in m["content"])
    p = tools.parse_message(m["content"])
    name = p.summary.split("Failed: ")[1].split(" (")[0]
    for bad in (p.summary + " Known: id=zz9999.", f"Done: {name}.", "Failed: nothing_failed (no error).",
                "The booking is BK0000001."):
        msgs = list(line["messages"])
        msgs[k] = dict(m, content=tools.render_message(bad, p.plan, p.calls))
        assert tools.summary_truth(dict(line, messages=msgs))[k], bad


def test_failed_calls_are_failed_not_done(data):
    """After a call returns an error its summary says Failed (with the error), not Done, until the function is
    called again and succeeds."""
    splits, _ = data
    changed = 0
    for line in splits["train"] + splits["val"] + splits["test"]:
        failing = {}  # function -> its latest error, within the turn
        for m in line["messages"]:
            if m["role"] == "user":
                failing = {}
            elif m["role"] == "tool":
                body = json.loads(m["content"])  # a call the tool world rejects, or one its function fails
                err = body.get("error") or (body["result"].get("error") if isinstance(body["result"], dict) else None)
                failing.pop(body["name"], None)
                failing.update({body["name"]: err} if err else {})
            elif m["role"] == "assistant" and "<summary>Pending" not in m["content"]:
                summary = tools.parse_message(m["content"]).summary
                done = re.search(r"Done: ([^.]*)\.", summary)
                for name, err in failing.items():
                    assert f"{name} ({err})" in summary.split("Failed: ")[1], (line["id"], summary)
                    assert not done or name not in done.group(1).split(", "), (line["id"], summary)
                    changed += 1
                assert ("Failed: " in summary) == bool(failing), (line["id"], summary)
    assert changed >= 5
    ep = tools.Episode(splits["train"][0], pa=True)  # the per-call error record, for an invalid call too
    ep.reset()
    ep.step('<summary></summary><plan>Next: x.</plan><tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    assert ep.turns[0]["errors"] == ["unknown function 'nope'"], ep.turns[0]["errors"]


def test_has_word():
    assert tools.has_word('{"id":"m1"}', "m1") and not tools.has_word('{"id":"m101"}', "m1")
    assert tools.has_word("80 percent.", "80") and tools.has_word("pay 80", "80") and tools.has_word("80", "80")
    assert not tools.has_word("balance 1500.0", "100") and tools.has_word("pay 100 now", "100") and not tools.has_word("12.5", "12")


def test_variant_shapes(data):
    splits, _ = data
    lines = splits["train"] + splits["val"] + splits["test"]
    seen = set()
    for line in lines:
        turns = line["turns"]
        for i, t in enumerate(turns):
            msgs = turn_messages(line, i)
            if t["type"] == "miss_param":
                nxt = turns[i + 1]
                assert t["gt"] == [] and nxt["gt"] and nxt["type"] == "normal"
                supplied = [v for s in nxt["gt"] for c in s for v in map(str, tools._scalars(c["arguments"]))
                            if tools.has_word(nxt["user"], v) and v not in {w.strip(".,?!'") for w in t["user"].split()}]
                assert supplied, (line["id"], t["user"], nxt["user"])  # the next turn gives the missing value
                assert not any(m["role"] == "tool" for m in msgs)  # the reference asks instead of calling
            elif t["type"] == "miss_func":
                nxt = turns[i + 1]
                (f,) = nxt["add_functions"]
                assert t["gt"] == [] and f in line["held_out"] and f in {c["name"] for s in nxt["gt"] for c in s}
                assert f not in {s["function"]["name"] for s in line["tools"]}
                assert not any(c["name"] == f for x in turns[:i + 1] for s in x["gt"] for c in s)
                assert "<tools>" in turn_messages(line, i + 1)[0]["content"]
            elif t["type"] == "long_context":
                assert max(len(m["content"]) for m in msgs if m["role"] == "tool") >= 1500
            elif t["type"] == "error_recovery":
                errs = ['"error"' in m["content"] for m in msgs if m["role"] == "tool"]
                assert any(errs) and not errs[-1], line["id"]  # a call fails, a later one succeeds
                failed = [json.loads(m["content"])["name"] for m in msgs if m["role"] == "tool" and '"error"' in m["content"]]
                assert failed[0] in [c["name"] for s in t["gt"][1:] for c in s]  # ... and is made again, corrected
            seen.add(t["type"])
    assert seen == set(tools.TURN_TYPES)


def turn_messages(line, i):
    """The messages of user turn i, starting with its user message."""
    starts = [k for k, m in enumerate(line["messages"]) if m["role"] == "user"] + [len(line["messages"])]
    return line["messages"][starts[i]:starts[i + 1]]


def test_no_split_leakage(data):
    splits, _ = data
    pairs = G.parse_pairs(G.WORLD_PRESETS["tiny"]["held_out_pairs"])  # SMALL keeps the default world
    train_keys = {G.task_key(t) for t in splits["train"]}
    for name in ("val", "test", "rl"):
        assert not train_keys & {G.task_key(t) for t in splits[name]}, name
    for name in ("train", "val", "rl"):
        for t in splits[name]:
            assert not any(set(p) <= funcs(t) for p in pairs), (name, t["id"])
    test = splits["test"]
    comp = [t for t in test if t["tags"]["slice"] == "held_out_composition"]
    long_ = [t for t in test if t["tags"]["slice"] == "long_horizon"]
    assert comp and all(any(set(p) <= funcs(t) for p in pairs) for t in comp)
    assert long_ and min(len(t["turns"]) for t in long_) > max(len(t["turns"]) for t in splits["train"])
    ids = [t["id"] for s in splits.values() for t in s]
    assert len(ids) == len(set(ids))
    assert all(t["split"] == name for name, s in splits.items() for t in s)


def test_stats_file(data):
    splits, out = data
    st = json.loads((out / "stats.json").read_text())
    assert st["episodes"] == {k: len(v) for k, v in splits.items()}
    tr = st["train"]
    assert tr["turns_max"] <= 4 and tr["distinct_user_strings"] > 0.5 * tr["user_turns"]
    assert st["tokens"]["train"]["mean"] > 100 and set(tr["augmented"]) == {"paraphrase", "schema", "mask"}


def test_augmented_copies(data):
    splits, _ = data
    by_id = {t["id"]: t for t in splits["train"]}
    aug = [t for t in splits["train"] if t["tags"].get("augment")]
    assert {t["tags"]["augment"] for t in aug} == {"paraphrase", "schema", "mask"}
    for t in aug:
        orig = by_id[t["id"].rsplit("-", 1)[0]]
        assert t["turns"][0]["gt"] == orig["turns"][0]["gt"]
        if t["tags"]["augment"] == "schema":
            offered = {s["function"]["name"]: s for s in t["tools"]}
            renames = t["tags"]["schema_renames"]
            for m in t["messages"]:
                for c in tools.parse_message(m["content"]).calls if m["role"] == "assistant" else []:
                    if c["name"] in offered:  # every argument is a parameter of the perturbed schema
                        assert set(c["arguments"]) <= set(offered[c["name"]]["function"]["parameters"]["properties"])
            assert renames or t["tools"] != orig["tools"]
        else:
            assert [x["user"] for x in t["turns"]] != [x["user"] for x in orig["turns"]]


ORACLE_GT = {}


def shown_key(messages, prefix):
    return json.dumps([m["content"] for m in messages]) + prefix


def oracle(contexts):
    """A fake model that completes a step's forced <summary>/<plan> with the step's reference calls iff every
    value they need (>= 2 characters) is in what it was shown (the context and the forced prefix), else with '?'
    in place of the missing values."""
    out = []
    for msgs, _, prefix in contexts:
        shown = " ".join(m["content"] for m in msgs) + prefix
        calls = ORACLE_GT[shown_key(msgs, prefix)]
        inferable = lambda f, k, v: len(str(v)) < 2 or not isinstance(v, (str, int, float)) or "enum" in \
            tools.SCHEMAS[f]["function"]["parameters"]["properties"][k]  # noqa: E731  ("get me 3 shares": side=buy)
        fixed = [{"name": c["name"], "arguments": {k: v if inferable(c["name"], k, v) or str(v) in shown else "?"
                                                   for k, v in c["arguments"].items()}} for c in calls]
        out.append(prefix + tools.render_message(None, None, fixed))
    return out


def learn_oracle(lines, mode):
    for line in lines:
        for st in tools.annotated_steps(line, mode):
            ORACLE_GT[shown_key(st["context"], st["prefix"])] = st["calls"]


def test_verification_step_by_step_in_the_training_context(data):
    splits, _ = data
    lines = [t for t in splits["train"] if not t["tags"].get("augment")][:80]
    for mode in ("full", "summary"):  # exact notes are sufficient in either context
        learn_oracle(lines, mode)
        out, rejected, table = G.verify(lines, oracle, mode)
        assert out == lines and rejected == [] and sum(v["steps"] for v in table.values()) > 80
        assert all(v["passed"] == v["steps"] for v in table.values())
    # break a fact that only the carried summary holds: drop "Known:" from the last turn's final summary and from
    # the step's own summary. Summary mode now cannot make the call; full mode still sees the history.
    broken, target = copy.deepcopy(lines), None
    for li, line in enumerate(broken):
        final, view = None, []
        for k, m in enumerate(line["messages"]):
            if m["role"] == "user":
                view = []
            elif m["role"] == "tool":
                view.append(m["content"])
            elif m["role"] == "assistant":
                p = tools.parse_message(m["content"])
                hidden = [v for v in G.known_values(p.summary) if not any(tools.has_word(x, v) for x in view)]
                if p.calls and final is not None and hidden:
                    for j in (final, k):
                        q = tools.parse_message(line["messages"][j]["content"])
                        line["messages"][j] = dict(line["messages"][j], content=tools.render_message(
                            re.split(r" ?Known: ", q.summary)[0], q.plan, q.calls, q.content))
                    target = (li, k)
                    break
                final = k if not p.calls else final
        if target:
            break
    assert target
    for mode, fails in (("summary", True), ("full", False)):
        learn_oracle(broken, mode)
        out, rejected, table = G.verify(broken, oracle, mode)
        assert (target[1] in out[target[0]].get("no_loss", [])) == fails, mode
        assert len(out) == len(broken) and all(r["reason"].startswith("wrong arguments") for r in rejected)
        assert len(rejected) >= fails and sum(v["steps"] - v["passed"] for v in table.values()) == len(rejected)
    # a summary that states something untrue is rejected whatever the model writes
    lie = copy.deepcopy(lines[:1])
    k = next(k for k, m in enumerate(lie[0]["messages"]) if m["role"] == "assistant" and tools.parse_message(m["content"]).calls)
    p = tools.parse_message(lie[0]["messages"][k]["content"])
    lie[0]["messages"][k]["content"] = tools.render_message((p.summary + " Known: id=zz404.").strip(), p.plan, p.calls)
    learn_oracle(lie, "full")
    out, rejected, _ = G.verify(lie, oracle, "full")
    assert out[0]["no_loss"] == [k] and rejected[0]["reason"].startswith("untrue summary")


def test_compare_calls():
    want = [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]
    assert tools.compare_calls(tools.render_message("s", "p", want[::-1]), want) == ""
    assert tools.compare_calls("<summary>s</summary>no calls", want) == "no tool call"
    assert tools.compare_calls(tools.render_message("s", "p", want[:1]), want).startswith("wrong function")
    assert tools.compare_calls(tools.render_message("s", "p", [{"name": "f", "arguments": {"a": 2}}, want[1]]), want).startswith("wrong arguments")


def test_verify_with_a_real_tiny_model(data, tmp_path):
    # the model path end to end: save a tiny random model, then gen_data.py --verify-with it. A random model fails
    # the steps: they stay in train.jsonl under "no_loss", no episode is dropped, stats.json counts them by type
    import torch  # noqa: F401
    import model as M
    splits, _ = data
    lines = splits["train"][:8]
    texts = [m["content"] for t in lines for m in t["messages"]]
    tok = M.train_tokenizer(texts, 300)
    cfg = M.tiny_config(len(tok), dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=4096,
                        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    M.save_model(M.Transformer(cfg).init_weights(0), tok, str(tmp_path / "ckpt"))
    gen = G.model_generator(str(tmp_path / "ckpt"), "cpu", max_new_tokens=8, max_len=4096, batch_size=4)
    replies = gen([(st["context"], st["tools"], st["prefix"]) for st in tools.annotated_steps(lines[0])])
    assert all(r.startswith(st["prefix"]) for r, st in zip(replies, tools.annotated_steps(lines[0])))
    args = ["--num-episodes", "40", "--num-rl", "4", "--stats-sample", "10", "--stats-vocab-size", "300"]
    out, st = G.main(args + ["--verify-with", str(tmp_path / "ckpt"), "--verify-max-new-tokens", "8", "--out-dir", str(tmp_path / "d")])
    plain, _ = G.main(args + ["--out-dir", str(tmp_path / "e")])
    assert [t["id"] for t in out["train"]] == [t["id"] for t in plain["train"]]
    v = st["verification"]
    n = sum(len(tools.annotated_steps(t)) for t in plain["train"] if not t["tags"].get("augment"))
    assert sum(x["steps"] for x in v.values()) == n and set(v) <= set(tools.TURN_TYPES)
    assert sum(len(t.get("no_loss", [])) for t in out["train"] if not t["tags"].get("augment")) == \
        n - sum(x["passed"] for x in v.values()) > 0
    for t in out["train"]:  # an augmented copy has the same steps, so it keeps its original's verdicts
        assert t.get("no_loss") == next(o for o in out["train"] if o["id"] == t["id"].rsplit("-", 1)[0]).get("no_loss") \
            if t["tags"].get("augment") else True


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gen_data.py"), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, msg", [(["--val-frac", "2"], "--val-frac"), (["--max-turns", "9"], "--max-turns"),
                                       (["--held-out-pairs", "nope+ls"], "--held-out-pairs"),
                                       (["--verify-with", "/nonexistent/ckpt"], "no such checkpoint"),
                                       (["--pa", "none", "--teacher", "."], "need --pa programmatic")])
def test_bad_args_fail_clearly_and_write_nothing(tmp_path, args, msg):
    out = tmp_path / "out"
    p = run_cli(*args, "--out-dir", str(out), "--num-episodes", "20")
    assert p.returncode != 0 and msg in p.stderr, p.stderr
    assert not out.exists() or not os.listdir(out)


def test_unwritable_out_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = run_cli("--out-dir", str(f / "sub"), "--num-episodes", "20")
    assert p.returncode != 0 and "Traceback" not in p.stderr and str(f) in p.stderr


def test_write_all_is_atomic(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl").write_text("old\n")
    real = open

    def failing(path, *a, **k):
        if "val" in str(path):
            raise OSError("disk full")
        return real(path, *a, **k)
    monkeypatch.setattr("builtins.open", failing)
    with pytest.raises(OSError):
        G.write_all(str(tmp_path), {"train.jsonl": "new\n", "val.jsonl": "new\n"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["train.jsonl"] and (tmp_path / "train.jsonl").read_text() == "old\n"


def test_no_awareness_data(tmp_path):
    splits, _ = G.main(["--num-episodes", "30", "--num-rl", "5", "--pa", "none", "--stats-sample", "10",
                        "--stats-vocab-size", "300", "--out-dir", str(tmp_path)])
    for line in splits["train"]:
        assert not any(re.search("<summary>|<plan>", m["content"]) for m in line["messages"][1:] if m["role"] == "assistant")
        assert feed(line, unrename(line)).success


@pytest.mark.skipif(not tools.bfcl_available(), reason="bfcl-eval not installed")
def test_bfcl_source_split_by_entry_id(tmp_path):
    splits, _ = G.main(["--source", "bfcl", "--bfcl-limit", "8", "--stats-sample", "5", "--stats-vocab-size", "300",
                        "--out-dir", str(tmp_path), "--paraphrase-rate", "0", "--mask-rate", "0", "--schema-rate", "0"])
    ids = {k: {t["id"] for t in v} for k, v in splits.items()}
    assert all(not ids[a] & ids[b] for a in ids for b in ids if a < b)
    assert len(ids["test"]) == 16 and len(ids["train"]) > 0
    for line in splits["train"] + splits["test"]:
        ep = feed(line)
        assert ep.success and ep.reward_parts()["awareness"] == 1.0, line["id"]


def test_teacher_rewrites_are_kept_only_if_the_facts_survive(data):
    splits, _ = data
    lines = [t for t in splits["train"] if not t["tags"].get("augment")][:20]
    n = sum(m["role"] == "assistant" and bool(tools.parse_message(m["content"]).summary) for x in lines for m in x["messages"])
    echo = lambda ctxs: ["In short: " + m[-1]["content"] for m, _, *rest in ctxs]  # noqa: E731  (a faithful teacher)
    out, kept, asked = G.teacher_rewrite(lines, True, echo)
    assert kept == asked == n and [x["id"] for x in out] == [x["id"] for x in lines]
    assert all(m["content"].startswith(("<summary>In short: ", "<summary></summary>")) for x in out for m in x["messages"]
               if m["role"] == "assistant")
    lossy = lambda ctxs: ["Some progress was made." for _ in ctxs]  # noqa: E731  (drops every fact)
    out, kept, asked = G.teacher_rewrite(lines, True, lossy)
    with_facts = sum(bool(G.known_values(tools.parse_message(m["content"]).summary)) for x in lines for m in x["messages"]
                     if m["role"] == "assistant")
    assert with_facts > 10 and kept <= n - with_facts
    for x, y in zip(out, lines):  # every summary that carried facts is still the exact one
        for a, b in zip(x["messages"], y["messages"]):
            if a["role"] == "assistant" and G.known_values(tools.parse_message(b["content"]).summary):
                assert a == b
    liar = lambda ctxs: [m[-1]["content"] + " Order o999999 is booked." for m, _, *rest in ctxs]  # noqa: E731
    out, kept, asked = G.teacher_rewrite(lines, True, liar)
    assert kept == 0 and out == lines  # a rewrite that adds an untrue value is not used


def test_every_intent_declares_its_functions():
    intents = {f for fs in G.FRESH.values() for f in fs} | {f for fs in G.CONSUMERS.values() for f in fs} | \
        set(G.ERRORS.values()) | set(G.LONG.values())
    assert intents <= set(G.FUNCS) and all(set(v.split()) <= set(tools.SCHEMAS) for v in G.FUNCS.values())


def test_domains_slice_the_tool_world(tmp_path):
    splits, st = G.main(["--num-episodes", "60", "--num-rl", "6", "--stats-sample", "10", "--stats-vocab-size", "300",
                         "--domains", "math,bank", "--out-dir", str(tmp_path)])
    used = {tools.OWNER[c["name"]] for lines in splits.values() for t in lines for x in t["turns"] for s in x["gt"] for c in s}
    assert used <= {"math", "bank"} and used
    assert all(t["tags"]["slice"] in ("test", "long_horizon") for t in splits["test"])   # no held-out pair fits
    p = run_cli("--domains", "math,cooking", "--out-dir", str(tmp_path / "x"), "--num-episodes", "20")
    assert p.returncode != 0 and "--domains: unknown ['cooking']" in p.stderr
