"""sft.py: loss mask, packing, normalisation, overfitting, DDP == 1 process, resume, HF export (CPU, tiny models)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import sft  # noqa: E402
import tools  # noqa: E402

from test_tools import math_task  # noqa: E402


def make_task(i, pa=True, context_mode="full"):
    """A 1-3 turn arithmetic task whose reference conversation comes from replaying its ground truth."""
    task = math_task(i, split="train")
    ep = tools.replay(task, [t["gt"] for t in task["turns"]], pa=pa, context_mode=context_mode)
    assert ep.success
    return dict(task, messages=ep.messages, tools=ep.tools), ep


@pytest.fixture(scope="module")
def tasks():
    return [make_task(i)[0] for i in range(12)]


@pytest.fixture(scope="module")
def chat(tasks):
    texts = [m["content"] for t in tasks for m in t["messages"]] + [json.dumps(t["tools"]) for t in tasks]
    return M.Chat(M.train_tokenizer(texts * 3, 600))


def tiny(chat, seed=1):
    cfg = M.tiny_config(len(chat.tok), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=2048)
    return M.Transformer(cfg).init_weights(seed)


def test_summary_conversations_match_summary_mode_episode():
    # SFT examples in summary mode must be exactly the contexts a summary-mode rollout shows the model
    for pa in (True, False):
        task, _ = make_task(2, pa=pa)
        _, ep = make_task(2, pa=pa, context_mode="summary")
        want, cur = [], None
        for m in ep.messages:  # a summary-mode episode restarts its context with a system message
            if m["role"] == "system":
                cur = []
                want.append(cur)
            cur.append(m)
        got = tools.conversations(task["messages"], "summary")
        assert len(got) == 3 and got == want
        assert "<summary>" in got[1][1]["content"] if pa else "<summary></summary>" in got[1][1]["content"]
        # the previous turn ended with a final reply (summary, no plan): its finished plan is not carried
        assert "<plan>" not in got[1][1]["content"]
    assert tools.conversations(task["messages"], "full") == [task["messages"]]


def test_loss_targets_are_exactly_the_assistant_tokens(tasks, chat):
    for mode in ("full", "summary"):
        examples, cut = sft.encode(chat, tasks, mode, 4096)
        assert cut == 0
        rows = sft.pack([len(e[0]) for e in examples], 1024)
        idx, tgt, wts, pos, doc, _ = sft.make_batch(rows, examples, 1024, 0)
        assert torch.equal(wts > 0, tgt != -100)
        for b, row in enumerate(rows):
            # the targets of a row, in order, decode to the assistant contents of its examples + end tokens
            got = chat.decode(tgt[b][tgt[b] != -100].tolist())
            want = "".join(m["content"] + "<|im_end|>" for e in row for m in examples_msgs(tasks, mode)[e]
                           if m["role"] == "assistant")
            assert got == want
            # and each target is the next input token (the shift is right)
            t = (tgt[b] != -100).nonzero()[:, 0]
            assert torch.equal(tgt[b, t], idx[b, t + 1])


def examples_msgs(tasks, mode):
    return [c for t in tasks for c in tools.conversations(t["messages"], mode)]


def awareness_tokens_by_decoding(chat, ids, weights):
    """Independent of Chat.render_parts' offsets: 1 on the tokens of an assistant content (a run of weighted
    tokens) whose decoded text starts inside that content's <summary>/<plan> head."""
    out, t = [0] * len(ids), 0
    while t < len(ids):
        if not weights[t]:
            t += 1
            continue
        run = t
        while t < len(ids) and weights[t]:
            t += 1
        content = chat.decode(ids[run:t - 1])  # the run ends with the end token
        head = tools.awareness_chars(content)
        for k in range(run, t - 1):
            out[k] = int(len(chat.decode(ids[run:k])) < head)
    return out


def test_awareness_weight(tasks, chat):
    """--awareness-weight W scales the loss on <summary>/<plan> tokens only; W = 0 gives exactly the gradient of
    the loss on the calls and replies alone (the no-awareness loss on the same tokens), W = 1 plain SFT."""
    plain, _ = sft.encode(chat, tasks[:6], "full", 4096)
    half, _ = sft.encode(chat, tasks[:6], "full", 4096, awareness_weight=0.5)
    zero, _ = sft.encode(chat, tasks[:6], "full", 4096, awareness_weight=0.0)
    by_hand = []
    for ids, w, _ in plain:
        head = awareness_tokens_by_decoding(chat, ids, w)
        assert set(w) == {0.0, 1.0} and sum(head) > 0
        by_hand.append((ids, [0.0 if h else x for x, h in zip(w, head)], []))
    assert [e[1] for e in zero] == [e[1] for e in by_hand]
    assert [e[1] for e in half] == [[0.5 if h and x else x for x, h in zip(w, awareness_tokens_by_decoding(chat, ids, w))]
                                    for ids, w, _ in plain]
    # the W = 0 targets decode to the assistant contents without their heads
    idx, tgt, wts, _, _, _ = sft.make_batch([[0]], zero, len(zero[0][0]), 0)
    msgs = [m["content"] for m in tasks[0]["messages"] if m["role"] == "assistant"]
    assert chat.decode(tgt[0][tgt[0] != -100].tolist()) == "".join(m[tools.awareness_chars(m):] + "<|im_end|>" for m in msgs)
    model = tiny(chat)
    rows = sft.pack([len(e[0]) for e in zero], 1300)
    assert max(map(len, rows)) > 1
    g0, g_hand = grads(model, chat, zero, rows, 2), grads(model, chat, by_hand, rows, 2)
    assert torch.allclose(g0, g_hand, atol=1e-7, rtol=1e-5)
    g1, g_half = grads(model, chat, plain, rows, 2), grads(model, chat, half, rows, 2)
    assert not torch.allclose(g0, g1, atol=1e-4) and not torch.allclose(g_half, g1, atol=1e-4)


def test_no_loss_messages_stay_as_context(tasks, chat):
    # a step that verification rejected ("no_loss") keeps its tokens in the input and loses its targets
    task = dict(tasks[1])
    k = next(i for i, m in enumerate(task["messages"]) if m["role"] == "assistant")
    (ids0, w0, _), = sft.encode(chat, [task], "full", 4096)[0]
    (ids1, w1, _), = sft.encode(chat, [dict(task, no_loss=[k])], "full", 4096)[0]
    assert ids0 == ids1 and sum(w1) < sum(w0)
    first = next(t for t, x in enumerate(w0) if x)
    n = len(chat.encode(task["messages"][k]["content"])) + 1
    assert w1[first:first + n] == [0.0] * n and w1[first + n:] == w0[first + n:]


def test_pack_is_a_partition_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 700) for _ in range(300)]
    rows = sft.pack(lengths, 1024)
    assert sorted(e for r in rows for e in r) == list(range(300))
    assert all(sum(lengths[e] for e in r) <= 1024 for r in rows)
    assert 1 - sum(lengths) / (len(rows) * 1024) < 0.05


def test_data_order_is_a_permutation_per_epoch_and_a_function_of_the_step():
    stream = [r for step in range(7) for r in sft.step_rows(step, 5, 3, seed=1)]  # 21 rows = 4.2 epochs of 5
    assert all(sorted(stream[i:i + 5]) == list(range(5)) for i in range(0, 20, 5))
    assert sft.step_rows(4, 5, 3, seed=1) == stream[12:15] and stream[:5] != stream[5:10]


def test_packing_does_not_leak_attention(tasks, chat):
    model = tiny(chat).eval()
    examples, _ = sft.encode(chat, tasks[:4], "full", 4096)
    row = [0, 1, 2, 3]
    seq_len = sum(len(e[0]) for e in examples) + 7  # trailing pads too
    batch = sft.make_batch([row, [2]], examples, seq_len, 0)
    with torch.no_grad():
        packed, tgt, _ = sft.forward_packed(model, batch, "cpu")   # logits at the target positions, row-major
        want, want_tgt = [], []
        for e in row + [2]:   # row 0 packs four examples; row 1 holds one alone (the plain causal path)
            ids, mask = torch.tensor(examples[e][0]), torch.tensor(examples[e][1][1:]) == 1
            want.append(model(ids[None])[0, :-1][mask])
            want_tgt.append(ids[1:][mask])
        want = torch.cat(want)
        assert packed.shape == want.shape and torch.equal(tgt, torch.cat(want_tgt))
        assert torch.allclose(packed, want, atol=1e-5), (packed - want).abs().max()


def test_document_masked_flex_attention_equals_the_dense_mask(tasks, chat):
    # sft.py's GPU path gives the dense block-diagonal mask's logits and loss (flex_attention runs eagerly on the
    # CPU, forward only: its CPU backward is not implemented; on a GPU the gradient is compared too)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny(chat).to(dev)
    examples, _ = sft.encode(chat, tasks[:5], "full", 4096)
    rows = [[0, 1, 2], [3, 4]]
    batch = sft.make_batch(rows, examples, sum(len(examples[e][0]) for e in rows[0]) + 5, 0)
    out = {}
    for flex in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(dev == "cuda"):
            logits, tgt, _ = sft.forward_packed(model, batch, dev, flex=flex)
            loss = sft.loss_sum(model, batch, dev, flex=flex)
        out[flex] = [logits.detach(), loss.detach()]
        if dev == "cuda":
            loss.backward()
            out[flex].append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def grads(model, chat, examples, rows, device_batch_size, copy_weight=0.0):
    """The training loop's accumulation: micro-batches of device_batch_size rows, loss / global targets (+ the copy
    loss / global copied tokens)."""
    model.zero_grad(set_to_none=True)
    n_targets = sum(sum(examples[e][1][1:]) for r in rows for e in r)
    n_pairs = sum(len(examples[e][2]) for r in rows for e in r)
    model.model.layers[-1].self_attn.record = copy_weight > 0
    for i in range(0, len(rows), device_batch_size):
        batch = sft.make_batch(rows[i:i + device_batch_size], examples, 1300, 0)
        loss = sft.loss_sum(model, batch, "cpu") / n_targets
        if copy_weight:
            loss = loss + copy_weight * sft.copy_loss_sum(model, -1, batch, "cpu") / n_pairs
        loss.backward()
    model.model.layers[-1].self_attn.record = False
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_is_invariant_to_micro_batch_size(tasks, chat):
    model = tiny(chat)
    examples, _ = sft.encode(chat, tasks, "summary", 1300)
    rows = sft.pack([len(e[0]) for e in examples], 1300)[:3]
    assert max(len(r) for r in rows) > 1  # the block-diagonal path
    g1, g3 = (grads(model, chat, examples, rows, k) for k in (1, 3))
    assert torch.allclose(g1, g3, atol=1e-6, rtol=1e-4), (g1 - g3).abs().max()
    # with the copy loss: its pairs' positions shift with the example's place in a packed row
    examples, _ = sft.encode(chat, tasks, "summary", 1300, tok_bytes=sft.token_bytes(chat.tok))
    assert sum(len(e[2]) for r in rows for e in (examples[i] for i in r)) >= 5
    c1, c3 = (grads(model, chat, examples, rows, k, copy_weight=1.0) for k in (1, 3))
    assert torch.allclose(c1, c3, atol=1e-6, rtol=1e-4), (c1 - c3).abs().max()
    assert not torch.allclose(c1, g1, atol=1e-4)


def copy_conversation():
    request = "Please send_message to Sami about 'Trip' and add 12 to 30."
    call = '<tool_call>{"name": "send_message", "arguments": {"to": "Sami", "subject": "Trip", "n": 12, "m": 7}}</tool_call>'
    return [{"role": "system", "content": "You call functions."}, {"role": "user", "content": request},
            {"role": "assistant", "content": call}, {"role": "tool", "content": '{"result": 42}'},
            {"role": "assistant", "content": call.replace('"m": 7', '"m": 42')}]


def test_copy_pairs_point_from_each_copied_byte_to_where_it_was(chat):
    tb = sft.token_bytes(chat.tok)
    assert tb is not None and b"".join(tb[i] for i in chat.encode("a 'Trip'")) == b"a 'Trip'"
    conv = copy_conversation()
    ids, mask = chat.render(conv)
    text = b"".join(tb[i] for i in ids)
    starts = [len(b"".join(tb[i] for i in ids[:j])) for j in range(len(ids) + 1)]
    pairs = sft.copy_pairs(ids, mask, tb)
    first, second = text.index(b"<tool_call>"), text.rindex(b"<tool_call>")
    covered = {}
    for q, src in pairs:
        t = q + 1  # the token this position predicts
        assert mask[t] and src and all(s <= q and starts[s] < starts[t] for s in src)   # sources lie before it
        assert starts[t] > second or not any(mask[s] for s in src)   # the first call's come from the request
        for byte in range(starts[t], starts[t + 1]):
            covered.setdefault(byte, src)
    want = set()   # every byte of the copied values, in both calls; not the function name, not 7 (nowhere before)
    for call in (first, second):
        for v in (b'"Sami"', b'"Trip"', b" 12,", b" 42}" if call == second else b""):
            if v:
                at = text.index(v, call) + 1
                want |= set(range(at, at + len(v) - 2))
    assert want <= set(covered)
    name = text.index(b"send_message", first)
    assert not set(range(name, name + 12)) & set(covered)
    seven = text.index(b"7", first)
    assert seven not in covered or covered[seven] == []
    # each copied byte points at tokens that hold that byte: 'S' of the call's "Sami" at the token with 'S' of
    # the request's " Sami" (its space fused in); 42 in the second call at the tool result, not the request
    for byte in want:
        assert all(text[byte:byte + 1] in tb[ids[s]] for s in covered[byte])
    forty_two = text.index(b"42", second)
    assert all(starts[s] > text.index(b'{"result": 42}') for s in covered[forty_two])


def test_copy_loss_reads_head_0_of_the_recorded_layer(tasks, chat):
    # the attention term's probabilities are those SDPA uses (scale, causal mask, query head 0 -> key/value head 0):
    # its mass-weighted values equal head 0's actual output at every copy position
    model = tiny(chat)
    examples, _ = sft.encode(chat, tasks[:3], "full", 4096, tok_bytes=sft.token_bytes(chat.tok))
    batch = sft.make_batch([[0, 1], [2]], examples, 4096, 0)
    row, qpos, src = batch[5]
    assert len(qpos) > 5
    attn = model.model.layers[-1].self_attn
    attn.record = True
    with torch.no_grad():
        sft.forward_packed(model, batch, "cpu")
        q, k, v = attn.recorded
        T = k.shape[2]
        doc = batch[4][:, :T]
        mask = ((doc.unsqueeze(2) == doc.unsqueeze(1)) & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, hd)
        scores = torch.einsum("nd,ntd->nt", q[row, 0, qpos], k[row, 0]) / q.shape[-1] ** 0.5
        p = scores.masked_fill(~mask[row, 0, qpos], float("-inf")).softmax(-1)
        assert torch.allclose(torch.einsum("nt,ntd->nd", p, v[row, 0]), y[row, 0, qpos], atol=1e-5)
        src = src[:, :T]
        assert not (src & ~mask[row, 0, qpos]).any()   # sources within the pair's own example
        # the loss: the attention term by hand + the output term (head 0's value at the sources through o_proj,
        # the final norm and the output layer must name the copied token)
        attend = -torch.log((p * src).sum(-1))
        o = torch.einsum("nt,ntd->nd", src.float() / src.sum(-1, keepdim=True), v[row, 0]) @ attn.o_proj.weight[:, :q.shape[-1]].T
        named = torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(o)), batch[0][row, qpos + 1], reduction="none")
        assert torch.allclose(sft.copy_loss_sum(model, -1, batch, "cpu"), (attend + named).sum(), rtol=1e-5)
        assert attn.recorded is None   # read once: a stale record never meets the next batch


def test_overfits_a_tiny_batch(tasks, chat):
    torch.manual_seed(0)
    model = tiny(chat)
    examples, _ = sft.encode(chat, tasks[:1], "full", 4096)
    batch = sft.make_batch([[0]], examples, len(examples[0][0]), 0)
    n = int((batch[1] != -100).sum())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = sft.loss_sum(model, batch, "cpu") / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.3, losses[::5]

# -----------------------------------------------------------------------------
# The script end to end, in subprocesses: 1 process, 2-process gloo DDP, interrupted + resumed


def run_sft(out, data, *flags, nproc=1):
    launch = [sys.executable, "sft.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "sft.py"]
    cmd = launch + ["--train", f"{data}/train.jsonl", "--val", f"{data}/val.jsonl", "--out-dir", str(out), "--device", "cpu",
                    "--num-steps", "6", "--seq-len", "1300", "--batch-tokens", "5200", "--warmup-steps", "2",
                    "--dim", "64", "--n-layers", "2", "--ffn-dim", "128", "--vocab-size", "600", "--lr", "3e-3",
                    "--pack", "on", "--eval-every", "3", "--eval-rows", "2", "--eval-tasks", "2", "--eval-max-new-tokens", "12"] + list(flags)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(p):
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    return out


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    os.makedirs(d / "data")
    for split, ids in (("train", range(24)), ("val", range(100, 104))):
        with open(d / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(make_task(i)[0]) + "\n" for i in ids)
    # two at a time on two cores: the reference and the interrupted run, then DDP and the resumed run
    a = run_sft(d / "one", d / "data", "--device-batch-size", "2")
    c = run_sft(d / "cut", d / "data", "--device-batch-size", "2", "--stop-at", "4")
    logs = {"one": wait(a), "cut": wait(c)}
    b = run_sft(d / "ddp", d / "data", "--device-batch-size", "1", nproc=2)  # 2 ranks x 2 micro-steps x 1 row
    r = run_sft(d / "cut", d / "data", "--device-batch-size", "2", "--resume")
    logs.update(ddp=wait(b), resumed=wait(r))
    return d, logs


def test_script_logs_and_evaluates(runs):
    d, logs = runs
    out = logs["one"]
    assert "padding" in out and "step     6/6 | loss" in out and "(2 greedy episodes)" in out
    assert "copy loss: weight 1, query head 0 of layer -2" in out and "| copy " in out   # on by default from scratch
    log = [json.loads(line) for line in open(d / "one" / "log.jsonl")]
    assert [e["step"] for e in log if "loss" in e] == list(range(1, 7))
    assert [e["step"] for e in log if "val_loss" in e] == [0, 3, 6]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    state = torch.load(d / "one" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 6 and state["args"]["num_steps"] == 6


def test_ddp_two_processes_equals_one(runs):
    # same global batch (4 rows of 1300, two examples each) split 2 ranks x 2 micro-steps x 1 row vs 1 process x 2 micro-steps x 2 rows:
    # only the summation order differs, so after 6 AdamW steps the weights agree to float32 rounding
    d, logs = runs
    assert "2 processes" in logs["ddp"]
    one, ddp = weights(d / "one"), weights(d / "ddp")
    for k in one:
        assert torch.allclose(one[k], ddp[k], atol=2e-5, rtol=0), (k, (one[k] - ddp[k]).abs().max())


def test_resume_equals_uninterrupted(runs):
    d, logs = runs
    assert "saved" in logs["cut"] and "step     4/6" in logs["cut"] and "step     5/6" not in logs["cut"]
    one, resumed = weights(d / "one"), weights(d / "cut")
    for k in one:  # same ops in the same order: bit for bit
        assert torch.equal(one[k], resumed[k]), (k, (one[k] - resumed[k]).abs().max())
    log = [json.loads(line) for line in open(d / "cut" / "log.jsonl")]
    assert [e["step"] for e in log if "loss" in e] == list(range(1, 7))
    assert [e["step"] for e in log if "val_loss" in e] == [0, 3, 4, 6]


def test_time_limit_saves_and_stops_after_one_step(runs):
    d, _ = runs
    out = wait(run_sft(d / "late", d / "data", "--device-batch-size", "2", "--time-limit", "1e-9"))
    assert "--time-limit 1e-09 s reached: stopping at step 1 of 6" in out and "step     2/6" not in out
    state = torch.load(d / "late" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1
    log = [json.loads(line) for line in open(d / "late" / "log.jsonl")]
    assert [e["step"] for e in log if "val_loss" in e] == [0, 1]   # evaluated at the step it stopped


def test_checkpoint_loads_in_transformers_with_same_logits(runs):
    import transformers as T
    d, _ = runs
    ours, tok = M.load_model(str(d / "one"))
    ref = T.AutoModelForCausalLM.from_pretrained(d / "one").eval()
    idx = torch.tensor([tok.encode("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        assert torch.allclose(ours.eval()(idx), ref(idx).logits, atol=1e-4)


def test_missing_data_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "sft.py", "--train", str(tmp_path / "nope.jsonl")], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "run python gen_data.py first" in p.stderr


@pytest.mark.parametrize("flags", [["--batch-tokens", "5000"], ["--batch-tokens", "8192", "--device-batch-size", "4"]])
def test_bad_batch_shape_is_a_clear_error(flags, tmp_path):
    with pytest.raises(SystemExit, match="--batch-tokens .* --device-batch-size"):
        sft.main(sft.parser.parse_args(flags + ["--out-dir", str(tmp_path), "--device", "cpu"]))
