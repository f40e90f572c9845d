"""eval.py: the oracle/empty controls (synthetic and BFCL), metrics on hand-built transcripts, the official BFCL
prompt setting, overflow accounting, a tiny random model through the sampler, and 2-process sharding == 1 process."""
import copy
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import eval as E  # noqa: E402
import model as M  # noqa: E402
import tools  # noqa: E402
from test_tools import CONFIGS, math_task, travel_task  # noqa: E402

def synthetic_tasks():
    """A small test set with every turn type and horizons 1-3 (the same shapes gen_data.py writes)."""
    send = travel_task()["turns"][1]["gt"][1]
    miss_param = travel_task(("normal", "miss_param"))
    miss_param["turns"][1]["gt"] = []
    miss_param["turns"].append({"user": "Subject 'Flight', body: the booking id.", "type": "normal",
                                "gt": [send], "add_functions": []})
    miss_func = travel_task(("normal", "miss_func"))
    miss_func["held_out"] = ["send_message"]
    miss_func["turns"][1]["gt"] = miss_func["turns"][1]["gt"][:1]
    miss_func["turns"].append({"user": "I have added a function. What about now?", "type": "normal", "gt": [send],
                               "add_functions": ["send_message"]})
    recovery = travel_task(("error_recovery", "normal"))
    recovery["turns"][0]["gt"].insert(1, [{"name": "book_flight", "arguments": {"flight_id": "FL2", "passenger": "Ann Lee"}}])
    cfg = copy.deepcopy(CONFIGS["files"])
    cfg["files"].update({f"/home/filler_{i}.txt": "x" * 200 for i in range(50)})
    long_ctx = {"id": "lc", "envs": {"files": cfg}, "held_out": [], "split": "test", "tags": {}, "turns": [
        {"user": "What is in a.txt?", "type": "long_context", "add_functions": [],
         "gt": [[{"name": "ls", "arguments": {}}], [{"name": "cat", "arguments": {"path": "a.txt"}}]]}]}
    tasks = [travel_task(), miss_param, miss_func, recovery, long_ctx] + [math_task(i) for i in range(4)]
    for i, t in enumerate(tasks):
        t["id"] = f"{t['id']}-{i}"
    return tasks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in synthetic_tasks()))
    return str(path)


def run(tmp_path, *flags, out_file=True):
    if not out_file:   # several data files: each eval writes its default out/eval/ file, here under tmp_path
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            E.main(E.parser.parse_args(list(flags) + ["--device", "cpu"]))
        finally:
            os.chdir(cwd)
        return None
    out = str(tmp_path / f"r{random.random()}.json")
    E.main(E.parser.parse_args(list(flags) + ["--out-file", out, "--device", "cpu"]))
    with open(out) as f:
        return json.load(f)


def needs_calls(task):
    return any(step for t in task["turns"] for step in t["gt"])

# -----------------------------------------------------------------------------
# controls


@pytest.mark.parametrize("mode,pa", [("full", "on"), ("full", "off"), ("summary", "on"), ("summary", "off")])
def test_oracle_is_perfect_and_empty_is_zero_synthetic(data, tmp_path, mode, pa):
    r = run(tmp_path, "--data", data, "--policy", "oracle", "--context-mode", mode, "--pa", pa)
    s = r["summary"]
    assert (s["success"], s["turns"], s["precision"], s["recall"], s["redundant"], s["format"]) == (1, 1, 1, 1, 0, 1)
    assert s["awareness"] == (1.0 if pa == "on" else None) and s["overflow"] == 0 and s["tasks"] == 9
    assert set(r["by_type"]) == set(tools.TURN_TYPES) and all(v["turns"] == 1 for v in r["by_type"].values())
    assert sorted(r["by_horizon"]) == ["1", "2", "3"]
    assert r["commit"] is None or len(r["commit"]) >= 40
    assert r["complete"] is True and r["episodes_planned"] == 9
    e = run(tmp_path, "--data", data, "--policy", "empty", "--context-mode", mode, "--pa", pa)
    tasks = synthetic_tasks()
    assert all(not rec["success"] for rec in e["records"] if needs_calls(tasks[rec["index"]]))
    assert e["summary"]["precision"] is None and e["summary"]["recall"] == 0
    # an empty policy can pass only turns whose right behaviour is to answer without calling
    assert all(t["gt_calls"] == 0 for rec in e["records"] for t in rec["turns"] if t["passed"])


def test_transcripts_keep_what_the_policy_wrote(data, tmp_path):
    plain = run(tmp_path, "--data", data, "--policy", "oracle")
    assert all("messages" not in rec for rec in plain["records"])
    r = run(tmp_path, "--data", data, "--policy", "oracle", "--transcripts")
    tasks = synthetic_tasks()
    for rec in r["records"]:
        msgs, task = rec["messages"], tasks[rec["index"]]
        users = [m["content"] for m in msgs if m["role"] == "user"]   # a turn that adds functions appends their schemas
        assert len(users) == len(task["turns"]) and all(u.startswith(t["user"]) for u, t in zip(users, task["turns"]))
        written = [c["name"] for m in msgs if m["role"] == "assistant" for c in tools.parse_message(m["content"]).calls]
        assert written == [c["name"] for t in task["turns"] for step in t["gt"] for c in step]
    assert r["summary"] == plain["summary"]


@pytest.mark.parametrize("prompt", ["official", "ours"])
def test_bfcl_controls_on_a_subset(tmp_path, prompt):
    if not tools.bfcl_available():
        pytest.skip("bfcl-eval not installed")
    r = run(tmp_path, "--bench", "bfcl", "--bfcl-prompt", prompt, "--policy", "oracle", "--limit", "5")
    assert r["bfcl"]["overall"] == 1.0 and all(c["accuracy"] == 1 and c["entries"] == 5 for c in r["bfcl"]["categories"].values())
    assert r["summary"]["success"] == 1.0 and r["setting"].endswith("official" if prompt == "official" else "full context)")
    e = run(tmp_path, "--bench", "bfcl", "--bfcl-prompt", prompt, "--policy", "empty", "--limit", "5")
    assert e["bfcl"]["overall"] == 0 and not any(rec["bfcl"] for rec in e["records"])
    assert not {"bfcl_eval.eval_checker.eval_runner", "bfcl_eval.constants.model_config"} & set(sys.modules)

# -----------------------------------------------------------------------------
# metrics on hand-built transcripts


def c(name, **a):
    return {"name": name, "arguments": a}


def test_metrics_on_a_hand_built_transcript():
    task = travel_task()
    ep = tools.Episode(task, pa=False)
    ep.reset()
    search = c("search_flights", origin="SFO", destination="JFK", date="2025-05-01")
    # turn 0: the right search twice in one message (1 repeat), a wrong booking, then a reply
    ep.step(tools.render_message(None, None, [search, search]))
    ep.step(tools.render_message(None, None, [c("book_flight", flight_id="FL2", passenger="Ann Lee")]))
    ep.step("Booked.")
    # turn 1: a right look-up and an unknown function, then a reply
    ep.step(tools.render_message(None, None, [c("search_contacts", query="Ann"), c("nope")]))
    ep.step("Sent.")
    assert ep.done
    rec = E.episode_record(task, 0, 0, {"episode": ep, "gen_tokens": 7, "segments": [{"ids": [1] * 30}, {"ids": [1] * 12}]})
    assert [(t["calls"], t["gt_calls"], t["matched"], t["repeats"]) for t in rec["turns"]] == [(3, 2, 1, 1), (2, 2, 1, 0)]
    assert rec["steps"] == 5 and rec["peak_ctx"] == 30 and rec["gen_tokens"] == 7 and not rec["success"]
    oracle = E.run_policy([tools.Episode(task, pa=False)], "oracle")[0]
    good = E.episode_record(task, 1, 0, oracle)
    s = E.summarize([rec, good])
    assert s["precision"] == pytest.approx((2 + 4) / (5 + 4)) and s["recall"] == pytest.approx((2 + 4) / 8)
    assert s["redundant"] == 0.5 and s["success"] == 0.5 and s["turns"] == 0.5 and s["steps"] == (5 + 6) / 2
    assert s["tokens"] == 3.5 and s["peak_ctx"] == 15 and s["max_ctx"] == 30
    assert s["format"] == 1.0  # a call to an unknown function is still a well-formed message
    by_type, by_horizon, by_slice = E.breakdown([rec, good])
    assert by_type["normal"]["turns_n"] == 4 and by_horizon[2] == {"episodes": 2, "success": 0.5, "turns": 0.5}
    assert by_slice == {rec["slice"]: {"episodes": 2, "success": 0.5, "turns": 0.5}}


def test_stops_after_a_tool_error_are_counted():
    task = travel_task()
    ep = tools.Episode(task, pa=False)
    ep.reset()
    search = c("search_flights", origin="SFO", destination="JFK", date="2025-05-01")
    ep.step(tools.render_message(None, None, [search, c("nope")]))   # one of two calls fails
    ep.step(tools.render_message(None, None, [search]))              # after the error: calls again, which succeeds
    ep.step("Done.")                                                   # after a success: not counted
    ep.step("<tool_call>{not json</tool_call>")                        # turn 1: a broken call is an error too
    ep.step(tools.render_message(None, None, [c("book_flight", flight_id="FL9", passenger="Ann Lee")]))  # env error
    ep.step("Sent.")                                                   # after the error: ends the turn
    assert ep.done
    assert [(a["after_error"], a["ends_turn"]) for a in ep.assistant] == \
        [(False, False), (True, False), (False, True), (False, False), (True, False), (True, True)]
    assert "error" in ep.messages[-2]["content"]   # FL9 does not exist: the env returned an error
    rec = E.episode_record(task, 0, 0, {"episode": ep, "gen_tokens": 0, "segments": []})
    assert (rec["after_error"], rec["stops_after_error"]) == (3, 1)
    oracle = E.episode_record(task, 1, 0, E.run_policy([tools.Episode(task, pa=False)], "oracle")[0])
    assert (oracle["after_error"], oracle["stops_after_error"]) == (0, 0)
    s = E.summarize([rec, oracle])
    assert (s["after_error"], s["stops_after_error"]) == (3, 1)


def test_sign_test_matches_exact_binomial_values():
    assert E.sign_test(0, 8) == pytest.approx(2 / 256) and E.sign_test(8, 0) == E.sign_test(0, 8)
    assert E.sign_test(3, 3) == 1.0 and E.sign_test(0, 0) == 1.0 and E.sign_test(0, 1) == 1.0
    assert E.sign_test(8, 1) == pytest.approx(2 * 10 / 512) and round(E.sign_test(14, 2), 3) == 0.004


def test_compare_pairs_two_results_files(data, tmp_path, capsys):
    def results(policy):
        out = str(tmp_path / f"{policy}.json")
        E.main(E.parser.parse_args(["--data", data, "--policy", policy, "--out-file", out, "--device", "cpu"]))
        return out
    oracle, empty = results("oracle"), results("empty")
    capsys.readouterr()
    E.main(E.parser.parse_args(["--compare", oracle, empty]))
    text = capsys.readouterr().out
    assert not any(r["success"] for r in json.load(open(empty))["records"])   # every task needs a call somewhere
    assert "paired over 9 episodes: solved by both 0, only by A 9, only by B 0, by neither 0" in text
    assert "p = 0.004" in text   # 2 / 2**9
    assert text.count("| oracle |") == 1 and text.count("| empty |") == 1 and text.count("| model |") == 1
    s = json.load(open(oracle))["summary"]
    assert s["after_error"] == 1 and s["stops_after_error"] == 0   # the error_recovery task: it calls again
    assert f"{oracle}: 0 of 1 messages after a tool error end the turn" in text
    other = str(tmp_path / "other.json")
    E.main(E.parser.parse_args(["--data", data, "--limit", "3", "--policy", "oracle", "--out-file", other, "--device", "cpu"]))
    with pytest.raises(SystemExit, match="different episodes"):
        E.compare(oracle, other)
    with pytest.raises(SystemExit, match="cannot read"):
        E.compare(oracle, str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text('{"records": [{"id": "x"}]}')
    with pytest.raises(SystemExit, match="not an eval.py results file"):
        E.compare(oracle, other)


def test_limit_spreads_over_every_slice_of_the_file():
    tasks = [{"id": i, "tags": {"slice": "short" if i < 70 else "long"}} for i in range(100)]  # slices in a row
    sub = E.spread(tasks, 10)
    assert [t["id"] for t in sub] == list(range(0, 100, 10))
    assert sum(t["tags"]["slice"] == "long" for t in sub) == 3  # a prefix of 10 would hold none
    assert len({t["id"] for t in E.spread(tasks, 64)}) == 64 and E.spread(tasks, 0) == tasks == E.spread(tasks, 500)


def test_turn_stats_is_a_multiset_match():
    gt = [[c("f", a=1), c("f", a=1)], [c("g")]]
    assert E.turn_stats([c("f", a=1)] * 3 + [c("g"), c("g")], gt) == (5, 3, 3, 2)  # f: 1 over the gt's 2; g: 1 over 1
    assert E.turn_stats([], gt) == (0, 3, 0, 0)
    assert E.turn_stats([c("f", a=2)], []) == (1, 0, 0, 0)
    assert E.turn_stats([{"name": "f", "arguments": {"b": 1, "a": 1}}], [[{"name": "f", "arguments": {"a": 1, "b": 1}}]])[2] == 1


def test_pass_at_k_counts_tasks_solved_by_any_sample():
    recs = [{"index": i, "sample": s, "success": ok, "turns": [], "awareness": [], "steps": 1, "format_ok": 1,
             "gen_tokens": 0, "peak_ctx": 0, "overflow": False, "forced": False, "after_error": 0, "stops_after_error": 0}
            for i, s, ok in [(0, 0, False), (0, 1, True), (1, 0, False), (1, 1, False)]]
    s = E.summarize(recs)
    assert s["pass@2"] == 0.5 and s["success"] == 0.25 and s["tasks"] == 2


def test_overflowed_episode_fails_even_with_right_calls():
    if not tools.bfcl_available():
        pytest.skip("bfcl-eval not installed")
    task = tools.bfcl_tasks("base", 1)[0]
    ep = tools.Episode(task, pa=False)
    ep.reset()
    while not ep.done:  # the oracle, but the sampler stops it before the final reply of the last turn
        if len(ep.turns) == len(ep.specs) and ep.turns[-1]["steps"] == len(ep.specs[-1]["gt"]):
            break
        ep.step(E.policy_message(ep, "oracle"))
    assert tools.bfcl_score(task, ep.decoded_calls())  # the calls alone would pass the official checker
    rec = E.episode_record(task, 0, 0, {"episode": ep, "gen_tokens": 0, "segments": []})
    assert rec["overflow"] and not rec["bfcl"] and not rec["success"] and not rec["turns"][-1]["passed"]
    s = E.bfcl_summary([rec], ["base"])
    assert s["categories"]["base"] == {"entries": 1, "accuracy": 0, "own_checker": 0, "overflow": 1, "forced": 0}

# -----------------------------------------------------------------------------
# the official BFCL prompt setting


def test_official_prompt_setting():
    if not tools.bfcl_available():
        pytest.skip("bfcl-eval not installed")
    from bfcl_eval.constants import default_prompts as P
    task = next(t for t in tools.bfcl_tasks("miss_func", 5) if t["held_out"])
    ep = tools.Episode(task, protocol="python")
    msgs = ep.reset()
    offered = [n for s in tools.Episode(task).tools for n in [s["function"]["name"]]]
    docs = [tools.bfcl_raw_doc(n) for n in offered]
    assert ep.tools == [] and msgs[0]["content"].startswith(P.PROMPT_STYLE_TEMPLATES["classic"]["persona"])
    assert P.OUTPUT_FORMAT_MAPPING["python"] in ep.system and json.dumps(docs, indent=4) in ep.system
    assert all(f'"name": "{n}"' not in ep.system for n in task["held_out"])
    assert docs[0]["description"].endswith("Note that the provided function is in Python 3 syntax.")
    # python-list calls run and the bare result string comes back; plain text ends the turn; broken calls too
    gt0 = task["turns"][0]["gt"][0]
    kind, out = ep.step("```\n" + tools.render_python_calls(gt0) + "\n```")
    assert kind == "continue" and [m["role"] for m in out] == ["tool"] * len(gt0) and not out[0]["content"].startswith('{"name"')
    assert ep.assistant[-1]["format_ok"] and ep.turns[0]["steps"] == 1
    kind, out = ep.step("cd(folder=)")
    assert kind == "continue" and out[0]["role"] == "user" and not ep.assistant[-1]["format_ok"]
    kind, out = ep.step("I am done with that.")
    assert ep.assistant[-1]["format_ok"] and len(ep.turns) == 3
    add = next(i for i, t in enumerate(task["turns"]) if t["add_functions"])
    while len(ep.turns) <= add:
        ep.step("ok")
    added = [tools.bfcl_raw_doc(n, hint=False) for n in task["turns"][add]["add_functions"]]
    assert ep.turns[add]["user"] == P.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING.format(functions=added)

# -----------------------------------------------------------------------------
# a tiny random model through the sampler; sharded runs


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    eps = [tools.replay(t, tools.ground_truth_calls(t)) for t in synthetic_tasks()]
    texts = [m["content"] for ep in eps for m in ep.messages] + [json.dumps(ep.tools) for ep in eps]
    tok = M.train_tokenizer(texts, 600)
    cfg = M.tiny_config(len(tok), dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                        max_seq_len=8192, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    M.save_model(M.Transformer(cfg).init_weights(3), tok, path)
    return path


MODEL_FLAGS = ["--max-new-tokens", "12", "--max-steps", "2", "--batch-size", "1"]


def test_tiny_model_through_the_sampler(data, tiny_ckpt, tmp_path):
    r = run(tmp_path, "--data", data, "--ckpt", tiny_ckpt, "--batch-size", "4", *MODEL_FLAGS[:4])
    s = r["summary"]
    assert s["episodes"] == 9 and s["tokens"] > 0 and s["peak_ctx"] > 500 and s["overflow"] == 0
    assert r["checkpoint"] == tiny_ckpt and r["model"] == "tiny" and "temperature" in r["args"]
    # a context budget smaller than the first prompt: every episode overflows and fails
    r = run(tmp_path, "--data", data, "--ckpt", tiny_ckpt, "--max-len", "200", *MODEL_FLAGS)
    assert r["summary"]["overflow"] == 9 and r["summary"]["success"] == 0 and r["summary"]["turns"] == 0


def launch(nproc, out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + ["eval.py", "--device", "cpu", "--out-file", out, *flags]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out) as f:
        return json.load(f), p.stdout


def test_two_processes_equal_one(data, tiny_ckpt, tmp_path):
    # one episode per forward pass and one sampling generator per episode: nothing can depend on the sharding
    flags = ["--data", data, "--ckpt", tiny_ckpt, "--samples", "2", *MODEL_FLAGS]
    one, _ = launch(1, str(tmp_path / "one.json"), *flags)
    two, log = launch(2, str(tmp_path / "two.json"), *flags)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert log.count("| model | setting |") == 1  # only rank 0 prints the results
    assert two["records"] == one["records"] and two["summary"] == one["summary"] and two["by_type"] == one["by_type"]
    assert [(r["index"], r["sample"]) for r in two["records"]] == [(i, s) for i in range(9) for s in range(2)]
    assert "pass@2" in two["summary"] and "2 samples at T=1.0" in two["setting"]


def test_bad_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(synthetic_tasks()[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:2: not valid JSON"):
        tools.read_tasks(str(bad))
    with pytest.raises(SystemExit, match="not found"):
        tools.read_tasks(str(tmp_path / "nope.jsonl"))


def test_time_limit_stops_between_batches_and_keeps_the_spread(data, tmp_path):
    # out of time after the first batch: its 3 episodes are every 3rd task of the 9, not the first 3
    r = run(tmp_path, "--data", data, "--policy", "oracle", "--batch-size", "3", "--time-limit", "1e-9")
    assert [rec["index"] for rec in r["records"]] == [0, 3, 6]
    assert r["summary"]["episodes"] == 3 and r["episodes_planned"] == 9 and r["summary"]["success"] == 1
    assert r["complete"] is False and "(cut: 3 of 9 episodes)" in E.markdown(r)


def test_default_out_file_names_the_data_file(data, tmp_path, monkeypatch):
    val = tmp_path / "val.jsonl"
    val.write_text(open(data).read())
    monkeypatch.chdir(tmp_path)   # the default lands under ./out/eval
    for path in (data, str(val)):
        E.main(E.parser.parse_args(["--data", path, "--policy", "oracle", "--limit", "2", "--device", "cpu"]))
    made = sorted(os.listdir(tmp_path / "out" / "eval"))
    assert made == ["test-oracle-paon-full.json", "val-oracle-paon-full.json"], made   # val did not overwrite test


def test_teacher_forced_next_call_accuracy(tiny_ckpt, tmp_path, monkeypatch):
    # one record per reference step that calls tools; a model that writes the reference calls scores 100%, one that
    # gets the arguments wrong keeps the function score; the tiny random model runs through the real sampler
    lines = []
    for t in synthetic_tasks():
        ep = tools.replay(t, tools.ground_truth_calls(t))
        lines.append(dict(t, messages=ep.messages, tools=ep.tools))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    n_steps = sum(len(tools.annotated_steps(x)) for x in lines)
    r = run(tmp_path, "--data", str(data), "--ckpt", tiny_ckpt, "--teacher-forced", *MODEL_FLAGS)
    assert r["mode"] == "teacher_forced" and r["summary"]["steps"] == n_steps == len(r["records"]) > 10
    assert set(r["by_type"]) <= set(tools.TURN_TYPES) and "teacher-forced" in r["setting"]
    gt = {json.dumps([m["content"] for m in st["context"]]): st["calls"] for x in lines for st in tools.annotated_steps(x)}

    def perfect(model, chat, items, *a, **k):
        return [tools.render_message("", "Next: x.", gt[json.dumps([m["content"] for m in msgs])]) for msgs, _, _ in items]

    def wrong_args(model, chat, items, *a, **k):
        return [tools.render_message(None, None, [dict(c, arguments={"zz": 1}) for c in gt[json.dumps([m["content"] for m in msgs])]])
                for msgs, _, _ in items]
    monkeypatch.setattr(M, "complete", perfect)
    good = run(tmp_path, "--data", str(data), "--ckpt", tiny_ckpt, "--teacher-forced", *MODEL_FLAGS)
    assert good["summary"]["exact"] == good["summary"]["function"] == 1.0
    monkeypatch.setattr(M, "complete", wrong_args)
    bad = run(tmp_path, "--data", str(data), "--ckpt", tiny_ckpt, "--teacher-forced", *MODEL_FLAGS)
    assert bad["summary"]["exact"] == 0.0 and bad["summary"]["function"] == 1.0
    paths = []
    for name, res in (("a", good), ("b", bad)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(res, f)
    out = E.compare(*paths)   # paired by step
    assert f"only by A {n_steps}, only by B 0" in out
    plain = tmp_path / "plain.jsonl"  # tasks without reference messages (an rl.jsonl) cannot be teacher-forced
    plain.write_text("".join(json.dumps(t) + "\n" for t in synthetic_tasks()))
    with pytest.raises(SystemExit, match="reference messages"):
        run(tmp_path, "--data", str(plain), "--ckpt", tiny_ckpt, "--teacher-forced", *MODEL_FLAGS)


def test_results_files_and_the_table(data, tmp_path):
    # --results: one compact file per row (seeds as <row>-s<seed>.json), a section per data file; --table: the table
    # from those files alone, val and test side by side
    res = tmp_path / "results" / "toy"
    val = os.path.join(os.path.dirname(data), "val.jsonl")
    with open(data) as f, open(val, "w") as g:
        g.writelines(f.readlines()[:5])
    for policy, name in (("oracle", "1-oracle"), ("empty", "2-empty")):
        for seed in (0, 1):
            run(tmp_path, "--data", f"{val},{data}", "--policy", policy, "--results", str(res / f"{name}-s{seed}.json"),
                "--row", f"{name} policy", out_file=False)
    f = json.load(open(res / "1-oracle-s0.json"))
    assert set(f["evals"]) == {"synthetic-val", "synthetic-test"} and "records" not in f["evals"]["synthetic-test"]
    assert f["evals"]["synthetic-test"]["summary"]["success"] == 1.0 and len(f["evals"]["synthetic-test"]["episodes"]) == 9
    assert len(f["evals"]["synthetic-val"]["episodes"]) == 5
    t = E.table(str(res)).splitlines()
    assert t[0].startswith("| row | seeds | eval tasks | task success, val (%) |") and "task success, test (%)" in t[0]
    assert len(t) == 4 and t[2].startswith("| 1-oracle policy | 2 | test.jsonl 9, val.jsonl 5 | 100.0 ± 0.0 |")
    assert t[3].startswith("| 2-empty policy | 2 | test.jsonl 9, val.jsonl 5 | 0.0 ± 0.0 |")
    assert "BFCL" not in t[0] and "next call" not in t[0]   # columns empty in every row are left out
    out = E.compare(str(res / "1-oracle-s0.json"), str(res / "2-empty-s1.json"))
    assert "only by A 9, only by B 0" in out and "only by A 5, only by B 0" in out and "teacher-forced" not in out
    for name, steps in (("1-oracle-s0", [True, True, False]), ("2-empty-s1", [False, True, False])):
        f = json.load(open(res / f"{name}.json"))   # a teacher-forced eval beside the episodes: paired too
        f["evals"]["teacher-forced-val"] = {"episodes": {f"t#0.{i}": ok for i, ok in enumerate(steps)}}
        json.dump(f, open(res / f"{name}.json", "w"))
    out = E.compare(str(res / "1-oracle-s0.json"), str(res / "2-empty-s1.json"))
    assert "synthetic-test: paired over 9 episodes: solved by both 0, only by A 9" in out
    assert "teacher-forced-val: paired over 3 steps: solved by both 1, only by A 1, only by B 0, by neither 1" in out
    with pytest.raises(SystemExit, match="no results files"):
        E.table(str(tmp_path / "nothing"))


def test_results_files_of_one_data_file_per_run_still_tabulate(tmp_path):
    # files written before several data files per run name their sections "synthetic" / "teacher-forced"
    old = {"row": "1 old", "checkpoint": None, "model": "m", "train_s": 5.0,
           "evals": {"synthetic": {"args": {"data": "data/val.jsonl"}, "commit": "abcdef1", "hardware": "CPU",
                                   "summary": {"success": 0.25, "tasks": 4, "precision": 0.5, "recall": 0.5},
                                   "by_slice": {}, "episodes": {}},
                     "teacher-forced": {"args": {"data": "data/val.jsonl"}, "commit": "abcdef1", "hardware": "CPU",
                                        "summary": {"exact": 0.5}, "episodes": {}}}}
    (tmp_path / "1-old.json").write_text(json.dumps(old))
    t = E.table(str(tmp_path)).splitlines()
    assert t[0] == ("| row | seeds | eval tasks | task success, val (%) | next call exact (teacher-forced), val (%) | "
                    "call precision / recall, val (%) | train wall time (s) | hardware | commit |")
    assert t[2] == "| 1 old | 1 | val.jsonl 4 | 25.0 | 50.0 | 50.0 / 50.0 | 5 | CPU | `abcdef1` |"


def test_resume_continues_an_interrupted_eval(data, tiny_ckpt, tmp_path):
    # an eval cut after its first batch of 4, resumed: the same records as one uninterrupted run
    flags = ["--data", data, "--ckpt", tiny_ckpt, "--batch-size", "4", *MODEL_FLAGS[:4], "--device", "cpu"]
    whole = run(tmp_path, *flags[:-2])
    out = str(tmp_path / "cut.json")
    cut = dict(whole, complete=False, records=whole["records"][:4], wall_s=123.0)
    with open(out, "w") as f:
        json.dump(cut, f)
    E.main(E.parser.parse_args(flags + ["--out-file", out, "--resume"]))
    with open(out) as f:
        resumed = json.load(f)
    assert resumed["complete"] is True and resumed["wall_s"] >= 123.0
    assert resumed["records"] == whole["records"] and resumed["summary"] == whole["summary"]
    # another checkpoint's file is refused, not mixed in
    with open(out, "w") as f:
        json.dump(dict(cut, checkpoint="elsewhere"), f)
    with pytest.raises(SystemExit, match="another eval"):
        E.main(E.parser.parse_args(flags + ["--out-file", out, "--resume"]))
