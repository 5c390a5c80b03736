"""Pixel-space video DiT: the base model of 4Real-Video (paper sections 3.1 and 4.1).

Frames are cut into square pixel patches; every token of a clip attends to every
other (full spatio-temporal attention through torch's scaled_dot_product_attention,
which picks flash kernels on GPU). Positions use 3D RoPE over (frame, row, column),
so any number of frames and any resolution divisible by the patch size work.
Conditioning follows DiT's adaLN-Zero on c = time embedding + context embedding
(dynamic or freeze-time video) [+ pooled text]. Masked conditioning: a per-frame mask
marks frames given clean; those frames enter the model clean, and the mask itself is
an input channel, so one model serves image-to-video, interpolation, extension and
the first-row/first-column conditioning of the 4D model.

The 4D model drives the same blocks along other axes, so the forward pass is split
into ``embed`` -> ``time_context_embedding`` -> ``blocks`` -> ``final``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from model.qk_rope import apply_rope, qk_norm_rope, routes_to_op
from model.swiglu import swiglu

CONTEXT_DYNAMIC = 0
CONTEXT_FREEZE_TIME = 1


@dataclass
class DiTConfig:
    patch_size: int = 8
    """Side of the square pixel patch that becomes one token."""
    width: int = 1024
    """Token channels (the paper's "channel size")."""
    depth: int = 24
    """Number of transformer blocks."""
    heads: int = 8
    """Attention heads; width / heads must be a multiple of 16 (3D RoPE splits it over three axes)."""
    mlp_ratio: float = 4.5
    """SwiGLU hidden size as a multiple of width."""
    in_channels: int = 3
    """Channels per frame (RGB, values in [-1, 1])."""
    num_contexts: int = 2
    """Learned context embeddings: 0 = dynamic video, 1 = freeze-time video."""
    text_dim: int = 0
    """Channels of the pooled text embedding added to the conditioning vector (0 = no text)."""
    text_dropout: float = 0.1
    """Training only: chance per sample that the text is replaced by a learned null embedding, so the
    same model also learns the unconditional velocity that classifier-free guidance needs."""
    pixel_cond_channels: int = 0
    """Extra per-pixel conditioning channels concatenated to every frame (the upsampler's low-res video)."""
    qk_norm: bool = True
    """RMS-normalise queries and keys per head (keeps attention logits bounded in bf16)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    flow_shift: float = 1.0
    """Noise-level shift s the model trains and samples with (``rectified_flow.shift_time``): flow times t map
    to s t / (1 + (s - 1) t). 1 suits 32 x 32 frames; at 64 x 64 and up the unshifted model is wrong from pure
    noise, where sampling starts (docs/results.md, run 4). Saved in checkpoints, so generation uses it."""
    bias: bool = True
    """Biases on the blocks' linear layers (QKV, projection, SwiGLU, adaLN). Off at the paper preset: with
    them every block holds 10 parameter tensors instead of 5 (+2 norms), and the training job's per-tensor work
    (DeepSpeed's gradient hooks, bucket copies and norms) costs host time that bounded its steps
    (docs/performance.md, issue 15). Checkpoints saved before this field load with biases; a training run
    started with them continues with ``--set model.bias=true``."""
    checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs one more forward)."""

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio))


DIT_PRESETS: dict[str, DiTConfig] = {
    # CPU tests: a few thousand parameters, runs in milliseconds.
    "tiny": DiTConfig(patch_size=4, width=32, depth=2, heads=2, mlp_ratio=2.0),
    # The CPU demo: wider than a 4x4 patch's 64 values (+ mask), so the model can represent the
    # per-pixel noise it has to remove; the demo's 600 base steps at 32x32 take about 3 minutes on 2 cores.
    "demo": DiTConfig(patch_size=4, width=128, depth=4, heads=4, mlp_ratio=2.0),
    # The GPU proof run (docs/results.md): 64x64 frames, 16x16 tokens each, ~5M parameters, so the base,
    # every trained sync variant and the upsampler fit the 25 MB of weights shipped in the repository.
    # flow_shift 3: with s = 1 the proof base sampled garbage from pure noise (docs/results.md, run 4).
    "proof": DiTConfig(patch_size=4, width=192, depth=8, heads=3, mlp_ratio=2.5, flow_shift=3.0),
    # Single-GPU experiments (~30M parameters) at the paper's first resolution, 36x64: patch 4 gives the
    # same 9x16 tokens per frame as the paper preset's patch 8 at 72x128 (36 is not divisible by 8).
    "small": DiTConfig(patch_size=4, width=384, depth=12, heads=6, mlp_ratio=4.5, flow_shift=3.0),
    # The paper's base model: 24 blocks of width 1024, ~600M parameters.
    "paper": DiTConfig(patch_size=8, width=1024, depth=24, heads=8, mlp_ratio=4.5, flow_shift=3.0, bias=False),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    """A copy of a named preset with some fields replaced; unknown names give a clear error."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    return replace(DIT_PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------- positions


def rope_3d(frames: int, rows: int, cols: int, head_dim: int, theta: float = 10000.0,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [frames*rows*cols, head_dim/2] for tokens ordered (frame, row, col).

    A quarter of the rotary pairs encode the frame index, the rest are split between
    rows and columns; integer positions, so longer clips and larger frames extrapolate
    the same way the base grid does.
    """
    if head_dim % 16:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 16 for 3D RoPE")
    dim_f = 2 * (head_dim // 8)
    dim_hw = (head_dim - dim_f) // 2

    def angles(n: int, dim: int) -> torch.Tensor:
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        return torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq[None]

    af, ah, aw = angles(frames, dim_f), angles(rows, dim_hw), angles(cols, dim_hw)
    ang = torch.cat([
        af[:, None, None].expand(frames, rows, cols, -1),
        ah[None, :, None].expand(frames, rows, cols, -1),
        aw[None, None, :].expand(frames, rows, cols, -1),
    ], dim=-1).reshape(frames * rows * cols, head_dim // 2)
    return ang.cos().float(), ang.sin().float()


# ----------------------------------------------------------------------------- layers


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> sinusoidal features -> MLP (DiT's TimestepEmbedder)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # x1000 so the sinusoid frequencies see the same range as DDPM's integer steps.
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # also runs in a model cast to bf16


class RMSNorm(nn.Module):
    """RMSNorm whose weight follows the input dtype, so bf16 activations keep the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w_in = nn.Linear(width, 2 * hidden, bias=bias)  # gate and value in one GEMM
        self.w_out = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(swiglu(self.w_in(x)))


class Attention(nn.Module):
    """Full self-attention over one token sequence per batch row, fused QKV, 3D RoPE."""

    def __init__(self, width: int, heads: int, qk_norm: bool, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        head_dim = width // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # Heads stay inside each token ([s, n, h, d] in memory) and attention sees them through a transposed
        # view: cuDNN's attention lays its output out as the queries are, so the projection reads it as
        # [s, n, h * d] without the copy a [s, h, n, d] query layout made before it (one pass over the
        # tokens a block, forward; docs/performance.md).
        qkv = self.qkv(x)
        if isinstance(self.q_norm, RMSNorm) and routes_to_op(qkv):
            # the norms and RoPE in one Triton kernel each way (model/qk_rope.py: the same formulas; both norms are
            # built with the same eps)
            q, k, v = qk_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight, *rope, self.heads, self.q_norm.eps)
        else:
            q, k, v = rearrange(qkv, "s n (three h d) -> three s n h d", three=3, h=self.heads)
            cos, sin = (r[:, None] for r in rope)  # [n, 1, d/2]: the same angles for every head
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(rearrange(out, "s h n d -> s n (h d)"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: returns x + attn(...) + mlp(...) (the residual included)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, qk_norm: bool, bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm, bias)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(width, mlp_hidden, bias)
        self.ada = nn.Linear(width, 6 * width, bias=bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn: nn.Module | None = None) -> torch.Tensor:
        """x [S, N, width] token sequences, c [S, width] one conditioning vector per sequence.

        ``attn`` swaps in another attention module with the same shape (the sequential
        baseline fine-tunes a copy of the cross-time attention while the rest stays frozen).
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
        x = x + gate1 * (attn or self.attn)(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


def block_flops(width: int, mlp_hidden: int, seq_len: int, num_seqs: int) -> tuple[float, float]:
    """Forward FLOPs of one block over num_seqs sequences of seq_len tokens: (matmuls, attention).

    Counts 2 FLOPs per multiply-add of every GEMM; elementwise work (norms, RoPE,
    modulation) is left out, as in nanoGPT's and PaLM's MFU formulas.
    """
    tokens = seq_len * num_seqs
    per_token = 2 * (3 * width * width + width * width + 2 * width * mlp_hidden + mlp_hidden * width)
    attention = 2 * 2 * seq_len * seq_len * width * num_seqs  # QK^T and PV
    ada = 2 * width * 6 * width * num_seqs
    return float(per_token * tokens + ada), float(attention)


# ----------------------------------------------------------------------------- model


TUNED_COMPILE: dict[str, Any] = {"coordinate_descent_tuning": True}
"""torch.compile options of tuned blocks: inductor benchmarks block sizes and warp counts of every kernel it
generates (the norms, modulation, gating and FP8 casts between the GEMMs, all memory-bound) on the GPU at compile
time, instead of taking its heuristics' pick. On an H100 +2.8% on the bare base step and +2.0-2.5% samples/s
(0.9-1.1 MFU points) through the base job, for 1-1.5 minutes more of a first compile per process
(docs/performance.md, session 21); CPUs ignore it."""


def compile_kwargs(tune: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch.compile's keyword arguments with ``TUNED_COMPILE`` merged in when ``tune``. torch.compile takes a
    ``mode`` or ``options``, not both, so a mode becomes the options it stands for (max-autotune's already
    include this tuning)."""
    if not tune:
        return kwargs
    from torch._inductor import list_mode_options
    rest = {k: v for k, v in kwargs.items() if k != "mode"}
    mode = kwargs.get("mode") or "default"
    return {**rest, "options": {**list_mode_options(mode, kwargs.get("dynamic")), **TUNED_COMPILE,
                                **rest.get("options", {})}}


class VideoDiT(nn.Module):
    """Velocity model v(x_t, t | context, clean frames, mask[, text]) over [B, F, C, H, W] clips."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.flow_shift <= 0:
            raise ValueError(f"flow_shift must be positive (1 = no shift), got {cfg.flow_shift}")
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 16:
            raise ValueError(f"width {cfg.width} / heads {cfg.heads} must give a head size that is a multiple of 16")
        self.cfg = cfg = replace(cfg)  # own copy: flags like checkpointing may be flipped later
        p, d, C = cfg.patch_size, cfg.width, cfg.in_channels
        # +1 input channel: the per-frame "given clean" mask, broadcast over pixels.
        self.patch_embed = nn.Linear(p * p * (C + 1 + cfg.pixel_cond_channels), d)
        self.t_embed = TimestepEmbedder(d)
        self.context_embed = nn.Embedding(cfg.num_contexts, d)
        self.text_proj = nn.Linear(cfg.text_dim, d) if cfg.text_dim > 0 else None
        # What "no text" means to a text model: the unconditional branch of guidance and dropped captions.
        self.null_text = nn.Parameter(torch.zeros(d)) if cfg.text_dim > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_hidden, cfg.qk_norm, cfg.bias)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, p * p * C)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.context_embed.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero velocity.
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            if block.ada.bias is not None:
                nn.init.zeros_(block.ada.bias)
        for m in (self.final_ada, self.final_linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- pieces the 4D model reuses -------------------------------------------------

    def check_frames(self, x: torch.Tensor, name: str = "x") -> None:
        p, C = self.cfg.patch_size, self.cfg.in_channels
        if x.dim() < 5 or x.shape[-3] != C:
            raise ValueError(f"{name} must be [..., frames, {C}, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"{name}: frame size {tuple(x.shape[-2:])} must be divisible by the patch size {p}; "
                             f"resize or crop the frames")

    def embed(self, x: torch.Tensor, cond: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              pixels: torch.Tensor | None = None) -> torch.Tensor:
        """[B, F, C, H, W] noisy frames (+ clean frames where mask) -> tokens [B, F, n, width].

        ``pixels`` [B, F, pixel_cond_channels, H, W] is extra per-pixel conditioning.
        """
        self.check_frames(x)
        B, Fr, _, H, W = x.shape
        if mask is None:
            mask = x.new_zeros(B, Fr)
        if mask.shape != (B, Fr):
            raise ValueError(f"mask must be [B, F] = {(B, Fr)}, got {tuple(mask.shape)}")
        m = mask.to(x.dtype)[:, :, None, None, None]
        if cond is not None:
            if cond.shape != x.shape:
                raise ValueError(f"cond must match x {tuple(x.shape)}, got {tuple(cond.shape)}")
            # Given frames enter clean whatever noise the caller left in x.
            x = torch.where(m > 0, cond.to(x.dtype), x)
        parts = [x, m.expand(B, Fr, 1, H, W)]
        if self.cfg.pixel_cond_channels:
            want = (B, Fr, self.cfg.pixel_cond_channels, H, W)
            if pixels is None or tuple(pixels.shape) != want:
                raise ValueError(f"pixels must be {want}, got {None if pixels is None else tuple(pixels.shape)}")
            parts.append(pixels.to(x.dtype))
        x = torch.cat(parts, dim=2)
        p = self.cfg.patch_size
        patches = rearrange(x, "b f c (h p) (w q) -> b f (h w) (p q c)", p=p, q=p)
        return self.patch_embed(patches)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.t_embed(t)

    def time_context_embedding(self, t: torch.Tensor, context: torch.Tensor, text: torch.Tensor | None = None,
                               text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Conditioning vector c [B, width] = emb(t) + emb(context) [+ proj(pooled text) or the null text].

        ``text`` is [B, L, D] token embeddings (pooled over the tokens ``text_mask`` [B, L] marks real,
        so padding never dilutes a short prompt) or [B, D] pooled embeddings.
        """
        if t.dim() != 1:
            raise ValueError(f"t must be [B] flow times in [0, 1], got shape {tuple(t.shape)}")
        if context.shape != t.shape:
            raise ValueError(f"context must be [B] = {tuple(t.shape)}, got {tuple(context.shape)}")
        c = self.t_embed(t) + self.context_embed(context.long())
        if text is None:
            return c if self.null_text is None else c + self.null_text.to(c.dtype)
        if self.text_proj is None:
            raise ValueError("text given but the model has text_dim=0; build it with text_dim > 0")
        if text.dim() == 3:
            if text_mask is None:
                pooled = text.mean(dim=1)
            else:
                m = text_mask.to(text.dtype)[..., None]
                pooled = (text * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            pooled = text
        emb = self.text_proj(pooled.to(c.dtype))
        if self.training and self.cfg.text_dropout > 0:
            drop = torch.rand(t.shape[0], device=t.device) < self.cfg.text_dropout
            emb = torch.where(drop[:, None], self.null_text.to(emb.dtype).expand_as(emb), emb)
        return c + emb

    def rope(self, frames: int, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_3d(frames, rows, cols, self.cfg.head_dim, self.cfg.rope_theta, device)

    def run_block(self, block: DiTBlock, x: torch.Tensor, c: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor], attn: nn.Module | None = None) -> torch.Tensor:
        if self.cfg.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, rope, attn, use_reentrant=False)
        return block(x, c, rope, attn)

    def final(self, tokens: torch.Tensor, c: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens [B, F, n, width], c [B, width] -> frames [B, F, C, height, width]."""
        shift, scale = self.final_ada(F.silu(c))[:, None, None].chunk(2, dim=-1)
        out = self.final_linear(modulate(self.final_norm(tokens), shift, scale))
        p = self.cfg.patch_size
        return rearrange(out, "b f (h w) (p q c) -> b f c (h p) (w q)", h=height // p, w=width // p, p=p, q=p)

    # -- the base model -----------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, text: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                extra_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity [B, F, C, H, W] for noisy frames x at flow time t [B] (context: 0 dynamic, 1 freeze-time).

        ``extra_cond`` [B, width] is added to the conditioning vector c: a wrapping model embeds its own
        scalar inputs with it (the upsampler's noise-augmentation level) and keeps those parameters itself,
        so the DiT's parameter names, and the checkpoints saved with them, stay the same.
        """
        B, Fr, _, H, W = x.shape
        tokens = self.embed(x, cond, mask, pixels)
        if t.shape != (B,):
            raise ValueError(f"t must be [B] = ({B},), got {tuple(t.shape)}")
        c = self.time_context_embedding(t, context, text, text_mask)
        if extra_cond is not None:
            if tuple(extra_cond.shape) != tuple(c.shape):
                raise ValueError(f"extra_cond must be [B, width] = {tuple(c.shape)}, got {tuple(extra_cond.shape)}")
            c = c + extra_cond.to(c.dtype)
        p = self.cfg.patch_size
        rope = self.rope(Fr, H // p, W // p, x.device)
        h = rearrange(tokens, "b f n d -> b (f n) d")
        for block in self.blocks:
            h = self.run_block(block, h, c, rope)
        return self.final(rearrange(h, "b (f n) d -> b f n d", f=Fr), c, H, W)

    def flops_per_sample(self, frames: int, height: int, width: int) -> float:
        """Forward FLOPs for one clip (GEMMs + attention; x3 for a training step)."""
        cfg, p = self.cfg, self.cfg.patch_size
        n = (height // p) * (width // p)
        tokens = frames * n
        lin, att = block_flops(cfg.width, cfg.mlp_hidden, tokens, 1)
        io = 2 * tokens * cfg.width * p * p * (2 * cfg.in_channels + 1 + cfg.pixel_cond_channels)  # embed + final
        return cfg.depth * (lin + att) + io

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def compile_blocks(self, tune: bool = False, **kwargs) -> None:
        """torch.compile each block in place (torchtitan style; blocks share one compiled graph); ``tune``: with
        ``TUNED_COMPILE``'s options."""
        for block in self.blocks:
            block.compile(**compile_kwargs(tune, kwargs))
