"""rl.py: advantages, loss masking and normalisation, sampler/trainer log-probs, DDP, resume, learning signal."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import rl  # noqa: E402

import tools  # noqa: E402

HIDDEN = [s["function"]["name"] for s in tools.tool_schemas(["files"]) if s["function"]["name"] not in ("cat", "ls")]  # short prompts
TASKS = [
    {"id": f"t{i}", "envs": {"files": {"files": {f"/notes/{name}.txt": f"hello {name}"}, "cwd": "/"}},
     "turns": [{"user": f"Show me /notes/{name}.txt please.", "type": "normal",
                "gt": [[{"name": "cat", "arguments": {"path": f"/notes/{name}.txt"}}]], "add_functions": []}],
     "held_out": HIDDEN, "split": "rl"}
    for i, name in enumerate(["alpha", "beta", "gamma", "delta", "omega", "zeta"])]


def args_for(**kw):
    return rl.parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    texts = [json.dumps(t) for t in TASKS] * 5 + ["Show me the file please. hello"] * 20
    tok = M.train_tokenizer(texts, vocab_size=350)
    cfg = M.tiny_config(len(tok), dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=1024,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    M.save_model(M.Transformer(cfg).init_weights(seed=3), tok, str(d / "ckpt"))
    with open(d / "tasks.jsonl", "w") as f:
        f.write("".join(json.dumps(t) + "\n" for t in TASKS))
    return d


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], [3.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    a = rl.group_advantages(r, normalise=True)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()   # sample std of {1,0,0,1}
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (s + 1e-6))
    assert torch.equal(a[1], torch.zeros(4, dtype=torch.float64)) and torch.equal(a[2], torch.zeros(4, dtype=torch.float64))
    assert not torch.isnan(a).any()
    d = rl.group_advantages(r, normalise=False)   # dr_grpo: no std
    assert torch.allclose(d[3], torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64))
    p = rl.group_advantages(r, normalise=True, positive_only=True)   # above-mean episodes keep their value, the rest get 0
    assert torch.equal(p[0], a[0].clamp(min=0)) and p[0, 0] > 0 and p[0, 1] == 0
    assert torch.equal(p[3], torch.tensor([a[3, 0].item(), 0.0, 0.0, 0.0], dtype=torch.float64))


def test_shaping_only_groups():
    # group 0: same success and turns, rewards differ by an efficiency term -> shaping only
    # group 1: success differs -> not; group 2: all rewards equal -> not (no signal at all)
    part = lambda s, t: {"format": 1.0, "turns": t, "success": s, "efficiency": 1.0, "awareness": 0.5}
    parts = [part(0.0, 0.5), part(0.0, 0.5), part(1.0, 1.0), part(0.0, 0.5), part(0.0, 0.0), part(0.0, 0.0)]
    rewards = torch.tensor([0.40, 0.41, 1.70, 0.40, 0.15, 0.15], dtype=torch.float64)
    assert rl.shaping_only(rewards.view(3, 2), parts) == [True, False, False]
    # and GRPO does blow that 0.01 gap up to advantages about 1.4 apart
    a = rl.group_advantages(rewards.view(3, 2), normalise=True)[0]
    assert (a[1] - a[0]).item() > 1.0
    # only group 1's episodes differ in task success
    assert rl.success_split(parts, 2) == [False, True, False]
    assert rl.success_split(parts, 3) == [True, False]


def test_turn_advantages_by_hand():
    # group of 3: episode 0 passed both turns, 1 passed the first only, 2 reached one turn and failed it
    adv = rl.turn_advantages([[1.0, 1.0], [1.0, 0.0], [0.0]], group_size=3)
    r0 = torch.tensor([1.0, 1.0, 0.0])
    want0 = ((r0 - r0.mean()) / (r0.std() + 1e-6)).tolist()
    assert [a[0] for a in adv] == pytest.approx(want0)
    r1 = torch.tensor([1.0, 0.0])  # turn 2: only the two episodes that reached it
    assert [adv[0][1], adv[1][1]] == pytest.approx(((r1 - r1.mean()) / (r1.std() + 1e-6)).tolist())
    assert rl.turn_advantages([[1.0], [1.0]], group_size=2) == [[0.0], [0.0]]


class LogitsModel(torch.nn.Module):
    """A 'model' whose logits are a parameter: gradients show exactly which positions the loss touches."""

    def __init__(self, B, T, V):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(B, T, V))

    def forward(self, ids, logits_at=None):
        out = self.logits[:ids.shape[0], :ids.shape[1]]
        return out if logits_at is None else out[logits_at]


def toy_batch(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).long()
    return {"ids": ids, "mask": mask, "logp": -torch.rand(B, T, generator=g) * 3 * mask,
            "adv": torch.randn(B, T, generator=g) * mask}


def test_loss_gradient_is_zero_on_masked_positions():
    b = toy_batch()
    m = LogitsModel(3, 7, 11)
    with torch.no_grad():  # on-policy (ratio 1: nothing clipped), so every sampled position gets a gradient
        b["logp"][:, 1:] = M.token_logprobs(m.logits[:, :-1], b["ids"][:, 1:])
    loss, _ = rl.policy_loss(m, b, 10.0, args_for(kl_coef=0))
    loss.backward()
    g = m.logits.grad[:, :-1].abs().sum(-1)             # the logits at t predict token t+1
    target_mask = b["mask"][:, 1:].bool()
    assert (g[~target_mask] == 0).all() and (g[target_mask] > 0).all()


def toy_seqs(lengths, seed=1):
    seqs = []
    g = torch.Generator().manual_seed(seed)
    for n in lengths:
        m = [0] + [int(x) for x in (torch.rand(n - 1, generator=g) > 0.3)]
        seqs.append({"ids": torch.randint(0, 11, (n,), generator=g).tolist(), "mask": m,
                     "logp": [(-float(torch.rand((), generator=g)) if k else 0.0) for k in m],
                     "adv": [float(torch.randn((), generator=g)) if k else 0.0 for k in m]})
    return seqs


def logits_grad(seqs, rows, dbs, norm):
    """Gradient of the step's loss on a table of logits; seqs[j] reads row rows[j], in micro-batches of dbs."""
    m = LogitsModel(5, 9, 11)
    torch.manual_seed(0)
    m.logits.data = torch.randn(5, 9, 11)
    for i in range(0, len(seqs), dbs):
        mb = rl.collate(seqs[i:i + dbs], 0, "cpu")
        sub = LogitsModel(1, 1, 1)   # each micro-batch must see the same rows of logits as in the full batch
        sub.forward = lambda ids, logits_at, r=rows[i:i + dbs]: m.logits[r, :ids.shape[1]][logits_at]
        loss, _ = rl.policy_loss(sub, mb, norm, args_for(kl_coef=0))
        loss.backward()
    return m.logits.grad.clone()


def test_gradient_does_not_depend_on_micro_batch_size():
    seqs = toy_seqs((5, 9, 3, 7, 6))
    norm = float(sum(sum(s["mask"]) for s in seqs))
    grads = [logits_grad(seqs, list(range(5)), dbs, norm) for dbs in (1, 2, 5)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_skipping_tied_sequences_leaves_the_gradient():
    """with_signal drops the sequences whose sampled tokens all have advantage 0 (a tied group's), and only those: a
    sequence with a nonzero advantage only where nothing is sampled is dropped, one with a single nonzero sampled
    token is kept. The gradient of the step (same normaliser) is the same with or without the dropped ones."""
    seqs = toy_seqs((5, 9, 3, 7, 6))
    seqs[1]["adv"] = [0.0] * 9                                        # a tied group's sequence
    seqs[3]["adv"] = [0.0 if k else 5.0 for k in seqs[3]["mask"]]     # nonzero only where nothing is sampled
    t = seqs[4]["mask"].index(1)
    seqs[4]["adv"] = [0.0] * 6
    seqs[4]["adv"][t] = 0.5                                           # one sampled token with a signal
    norm = float(sum(sum(s["mask"]) for s in seqs))
    kept = rl.with_signal(seqs)
    assert [seqs.index(s) for s in kept] == [0, 2, 4]
    full = logits_grad(seqs, list(range(5)), 2, norm)
    part = logits_grad(kept, [0, 2, 4], 2, norm)
    assert full[4].abs().sum() > 0 and torch.allclose(full, part, atol=1e-7)


def test_sampler_logprobs_equal_trainer_logprobs_on_rollouts(setup):
    model, tok = M.load_model(str(setup / "ckpt"))
    args = args_for(max_new_tokens=10, group_size=4, pa="off", overlong="penalty")  # random text is cut by the budget
    eps = [rl.make_episode(t, args) for t in TASKS[:2] for _ in range(4)]
    res = M.rollout(model.eval(), M.Chat(tok), eps, max_new_tokens=10, max_len=2048, temperature=1.0,
                    seeds=range(8))
    r, parts, turns = rl.episode_rewards(res, args)
    adv = torch.randn(8)
    seqs = rl.build_sequences(res, adv, None, args)
    assert len(seqs) == 8 and all(s["adv"][t] == float(adv[i]) for i, s in enumerate(seqs) for t in range(len(s["mask"])) if s["mask"][t])
    mb = rl.collate(seqs, tok.pad_token_id, "cpu")
    assert tok.pad_token_id != tok.eos_token_id
    _, st = rl.policy_loss(model, mb, 1.0, args)
    assert st["tokens"] > 20
    assert abs(float(st["kl_old"])) / float(st["tokens"]) < 1e-5   # log-ratio 0: old logp == trainer logp
    assert float(st["clipfrac"]) == 0


def run_toy(setup, out, steps, nproc=1, crash=-1, resume=False, extra=(), target="even"):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [os.path.join(ROOT, "tests", "rl_toy.py"),
                                     f"--init-from={setup / 'ckpt'}", f"--tasks={setup / 'tasks.jsonl'}",
                                     f"--eval-tasks={setup / 'tasks.jsonl'}", f"--out-dir={out}", f"--num-steps={steps}",
                                     "--prompts-per-step=4", "--group-size=4", "--max-new-tokens=8", "--max-len=2048",
                                     "--eval-every=0", "--device-batch-size=3", "--lr=3e-3", "--warmup-steps=1",
                                     "--save-every=1", "--pa=off", "--device=cpu", "--overlong=penalty", *extra] + (["--resume"] if resume else [])
    env = {**os.environ, "TOY_CRASH_AT": str(crash), "TOY_TARGET": str(target), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return p


def why(p):
    """A failed run's output for the assertion message: torchrun puts its own summary after the child's traceback,
    so keep the start of stderr as well as its end."""
    err = p.stderr if len(p.stderr) <= 6000 else p.stderr[:3000] + "\n[...]\n" + p.stderr[-3000:]
    return p.stdout[-2000:] + "\n--- stderr ---\n" + err


def params(out):
    return load_file(os.path.join(out, "model.safetensors"))


def test_ddp_two_processes_equal_one(setup):
    a = run_toy(setup, setup / "one", 2)
    assert a.returncode == 0, why(a)
    b = run_toy(setup, setup / "two", 2, nproc=2)
    assert b.returncode == 0, why(b)
    pa, pb = params(setup / "one"), params(setup / "two")
    start = params(setup / "ckpt")
    assert any(not torch.equal(pa[k], start[k]) for k in pa)   # training did move the weights
    for k in pa:  # same global batch, same samples: equal up to float summation order
        assert torch.allclose(pa[k], pb[k], atol=2e-5), (k, (pa[k] - pb[k]).abs().max())


def test_resume_equals_uninterrupted(setup):
    a = run_toy(setup, setup / "full", 3)
    assert a.returncode == 0, why(a)
    b = run_toy(setup, setup / "cut", 3, crash=2)
    assert b.returncode != 0 and "toy crash at step 2" in b.stderr + b.stdout
    c = run_toy(setup, setup / "cut", 3, resume=True)
    assert c.returncode == 0 and "resumed from" in c.stdout, why(c)
    pa, pc = params(setup / "full"), params(setup / "cut")
    for k in pa:
        assert torch.equal(pa[k], pc[k]), k


def test_step_with_every_group_tied_leaves_the_weights(setup):
    """A step whose groups all tie has no learning signal (zero advantages, zero gradient); AdamW's momentum from the
    step before must not move the weights on it. Step 0 learns; step 1 rewards no token (target -1), so every group ties."""
    a = run_toy(setup, setup / "tied", 1)
    assert a.returncode == 0, why(a)
    before = params(setup / "tied")
    assert any(not torch.equal(before[k], v) for k, v in params(setup / "ckpt").items())
    b = run_toy(setup, setup / "tied", 2, resume=True, target=-1)
    assert b.returncode == 0 and "resumed from" in b.stdout, why(b)
    log = [json.loads(line) for line in open(setup / "tied" / "log.jsonl") if '"reward"' in line]
    assert log[-1]["step"] == 1 and log[-1]["zero_var_frac"] == 1.0 and log[-1]["grad_norm"] == 0.0
    assert log[0]["trained_frac"] > 0 and log[-1]["trained_frac"] == 0.0   # tied: no forward/backward pass at all
    after = params(setup / "tied")
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_time_limit_saves_and_stops_after_one_step(setup):
    p = run_toy(setup, setup / "late", 3, extra=["--time-limit=1e-9"])
    assert p.returncode == 0 and "--time-limit 1e-09 s reached: stopping at step 1 of 3" in p.stdout, why(p)
    log = [json.loads(line) for line in open(setup / "late" / "log.jsonl") if '"reward"' in line]
    assert [r["step"] for r in log] == [0]
    assert torch.load(setup / "late" / "trainer_state.pt", weights_only=False)["step"] == 1


def test_reward_rises_on_a_learnable_toy(setup):
    p = run_toy(setup, setup / "learn", 20, extra=["--lr=2e-2", "--save-every=100", "--group-size=8"], target=5)
    assert p.returncode == 0, why(p)
    log = [json.loads(line) for line in open(setup / "learn" / "log.jsonl") if '"reward"' in line]
    early = sum(r["reward"] for r in log[:3]) / 3
    late = sum(r["reward"] for r in log[-3:]) / 3
    assert late > early + 0.1, (early, late)   # seen: 0.003 -> 0.46 (it starts to rise at about step 5)
    assert all(0.0 <= r["shaping_frac"] <= 1.0 for r in log) and "shaping-only" in p.stdout
    assert all(0.0 <= r["success_frac"] <= 1.0 for r in log) and "success-split" in p.stdout


def test_curve_svg_plots_the_log(tmp_path):
    import xml.etree.ElementTree as ET
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "eval_success": 0.0, "eval_turns": 0.1},
                                                      {"step": 0, "reward": 0.2, "success": 0.0},
                                                      {"step": 1, "reward": 0.4, "success": 0.25},
                                                      {"step": 2, "eval_success": 0.5, "eval_turns": 0.6}]) + "\n")
    rl.write_curve(str(log), str(tmp_path / "curve.svg"))
    svg = ET.parse(tmp_path / "curve.svg").getroot()
    lines = [e.get("points").split() for e in svg.iter("{http://www.w3.org/2000/svg}polyline")]
    assert [len(p) for p in lines] == [2, 2, 2, 2]         # reward, rollout success, eval success, turn rate
    (x0, y0), (x1, y1) = (map(float, p.split(",")) for p in lines[0])
    assert x1 > x0 and y1 < y0                              # later step to the right, higher reward drawn higher
    (log := tmp_path / "train_only.jsonl").write_text(json.dumps({"step": 0, "reward": 0.2, "success": 0.0}) + "\n")
    rl.write_curve(str(log), str(tmp_path / "curve.svg"))
    legend = [e.text for e in ET.parse(tmp_path / "curve.svg").getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert "reward (train)" in legend and "task success (eval)" not in legend   # no legend entry without a line
