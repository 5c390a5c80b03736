"""The 4D video model (paper section 3.2 and the ablations of section 7).

A 4D video is a grid x[b, v, t] of V views by T times: each row (fixed v) is a
fixed-view video, each column (fixed t) a freeze-time video. Two token streams over
the whole grid reuse the frozen blocks of the base VideoDiT:

* the view stream runs each block over every time column (the V frames of one
  instant, camera moving) with the freeze-time context;
* the time stream runs each block over every view row (the T frames of one camera)
  with the dynamic context.

After every block a synchronization layer exchanges information between the two
streams (``SYNC_VARIANTS``):

* ``soft`` (Eqs. 9-10): a flow-time-modulated linear layer predicts (dy^v, dy^t) from
  both streams; initialised at zero (each stream is exactly the base model along its
  axis) or at the training-free schedule of Eq. 13;
* ``hard`` (Eq. 8): x_{l+1} = W^v y^v + W^t y^t with W^v, W^t full linear maps
  initialised at I/2 and modulated by flow time, as the paper writes it; soft and
  hard then differ in mechanism (two streams vs one merged stream), not in what a
  layer can express per token (``hard_channel`` keeps the cheaper per-channel form);
* ``hard_channel``: Eq. 8 with per-channel (diagonal) W^v, W^t;
* ``sequential`` (Eq. 5): view pass then time pass in one stream; its trainable part
  is a copy of each block's attention used by the time pass (the paper's
  "sequential trained" baseline);
* ``train_free_hard`` (Eq. 12) and ``train_free_soft`` (Eq. 13, w_l = 0.1 + 0.4 l/L):
  parameter-free averaging;
* ``train_free_sequential`` (Eq. 5 with the base's own attention): the interleaving
  most prior work uses, with nothing trained (section 7's training-free baseline).

The base model is frozen; only synchronization parameters train. The output velocity
is the mean of the final layer applied to each stream with its own context.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.dit import CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME, VideoDiT, block_flops, compile_kwargs

SOFT_INITS = ("zero", "schedule")


@dataclass
class FourDConfig:
    sync: str = "soft"
    """Synchronization variant, one of SYNC_VARIANTS."""
    soft_init: str = "zero"
    """Soft sync initialisation: "zero" (streams start independent) or "schedule" (Eq. 13 weights)."""

    def __post_init__(self) -> None:
        if self.sync not in SYNCS:
            raise ValueError(f"unknown sync variant {self.sync!r}; choose one of {tuple(SYNCS)}")
        if self.soft_init not in SOFT_INITS:
            raise ValueError(f"unknown soft_init {self.soft_init!r}; choose one of {SOFT_INITS}")


def schedule_weight(layer: int, depth: int) -> float:
    """Eq. 13: w_l = 0.1 + 0.4 l / L, with l = 1..L so the last layer averages the streams fully."""
    return 0.1 + 0.4 * (layer + 1) / depth


def memory_order(x: torch.Tensor) -> list[int]:
    """x's dimensions from the outermost in memory to the innermost (x.permute(order) is contiguous for a
    permuted dense tensor)."""
    return sorted(range(x.dim()), key=lambda i: -x.stride(i))


def _inverse(order: list[int]) -> list[int]:
    return [order.index(i) for i in range(len(order))]


def _in_order(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    return x.permute(order).contiguous().permute(_inverse(order))


def in_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (shaped as like) laid out in memory as like is: a no-op when it already is, one strided write
    otherwise, which torch.compile fuses into the kernel that computes x."""
    return _in_order(x, memory_order(like))


class _GradInLayout(torch.autograd.Function):
    """The identity, with the gradient laid out as the input is. A compiled backward returns its input
    gradients contiguous (on CUDA), and a permuted input's would then be regrouped by a copy outside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.order = memory_order(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _in_order(grad, ctx.order)


def grad_in_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself, whose gradient will be laid out in memory as x is (fused into the backward's kernels)."""
    return _GradInLayout.apply(x) if x.requires_grad else x


def tokenwise(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A map over the last (channel) dimension applied in x's memory order: the same values as f(x), but a
    permuted x is not copied to be flattened for the GEMM (a per-token map does not care in which order its
    tokens come)."""
    order = memory_order(x)
    if order[-1] != x.dim() - 1:
        return f(x)
    return f(x.permute(order)).permute(_inverse(order))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, 1, ..., 1, C], broadcasting over like's token dimensions."""
    return v.view(v.shape[0], *(1,) * (like.dim() - 2), v.shape[-1])


class SoftSync(nn.Module):
    """(dy^v, dy^t) = Linear([y^v, y^t]) * (1 + g(t)); x^v = y^v + dy^v, x^t = y^t + dy^t (Eqs. 9-10)."""

    def __init__(self, width: int, init_weight: float | None):
        super().__init__()
        self.linear = nn.Linear(2 * width, 2 * width)
        self.time_gate = nn.Linear(width, 2 * width)  # flow-time modulation, zero at init
        nn.init.zeros_(self.time_gate.weight)
        nn.init.zeros_(self.time_gate.bias)
        nn.init.zeros_(self.linear.bias)
        with torch.no_grad():
            self.linear.weight.zero_()
            if init_weight is not None:
                # dy^v = w (y^t - y^v), dy^t = w (y^v - y^t): Eq. 13's weighted averaging.
                eye = torch.eye(width) * init_weight
                self.linear.weight.copy_(torch.cat([torch.cat([-eye, eye], 1), torch.cat([eye, -eye], 1)], 0))

    def forward(self, yv: torch.Tensor, yt: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """yv, yt [B, ..., width] aligned tokens in any memory layout; temb [B, width] flow-time embedding.

        Each output keeps its input's memory layout (``in_layout``): in the 4D model the view stream's tokens
        lie as its view pass reads them, so compiled, the regrouping between the passes costs no copy.
        """
        yv, yt = grad_in_layout(yv), grad_in_layout(yt)
        gate = _per_sample(self.time_gate(F.silu(temb)), yv)
        dv, dt = (self.linear(torch.cat([yv, yt], dim=-1)) * (1 + gate)).chunk(2, dim=-1)
        return in_layout(yv + dv, yv), in_layout(yt + dt, yt)


class HardSync(nn.Module):
    """x = (1 + m^v(t)) W^v y^v + (1 + m^t(t)) W^t y^t, one merged stream (Eq. 8).

    ``full``: W^v, W^t are width x width linear maps initialised at I/2 (the paper's
    "linear weights ... with initial values 1/2 I"); otherwise per-channel weights at 1/2.
    The flow-time modulation m(t) starts at zero, so at init the layer is Eq. 12's average.
    """

    def __init__(self, width: int, full: bool = True):
        super().__init__()
        self.full = full
        if full:
            self.w_view = nn.Linear(width, width, bias=False)
            self.w_time = nn.Linear(width, width, bias=False)
            with torch.no_grad():
                self.w_view.weight.copy_(torch.eye(width) * 0.5)
                self.w_time.weight.copy_(torch.eye(width) * 0.5)
        else:
            self.w_view = nn.Parameter(torch.full((width,), 0.5))
            self.w_time = nn.Parameter(torch.full((width,), 0.5))
        self.time_mod = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.time_mod.weight)
        nn.init.zeros_(self.time_mod.bias)

    def forward(self, yv: torch.Tensor, yt: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """yv, yt [B, ..., width] aligned tokens in any memory layout -> the merged stream, laid out as yt."""
        yv, yt = grad_in_layout(yv), grad_in_layout(yt)
        mv, mt = _per_sample(self.time_mod(F.silu(temb)), yv).chunk(2, dim=-1)
        if self.full:
            merged = (1 + mv) * tokenwise(self.w_view, yv) + (1 + mt) * tokenwise(self.w_time, yt)
        else:
            merged = self.w_view * (1 + mv) * yv + self.w_time * (1 + mt) * yt
        # fp32 weights must not promote a bf16 token stream to fp32 (memory, kernel choice).
        return in_layout(merged.to(yv.dtype), yt)


class Passes(NamedTuple):
    """What a sync variant's layer step gets besides the tokens: the base block run along each axis.

    Both passes take and return the grid's tokens g [B, V, T, n, d], so the two streams are always indexed
    alike (elementwise mixing of them is right whatever their memory layout). The view pass returns its
    tokens as it computed them, time columns outermost in memory (a transposed view, not a copy), and reads
    such a tensor without a copy; the time pass reads and writes view rows outermost (contiguous). A step
    that keeps each stream in its own pass's layout (``in_layout``) saves the regrouping copies.
    """
    view: Callable[..., torch.Tensor]
    """view(block, g): the block over every time column (V frames of one instant), freeze-time context."""
    time: Callable[..., torch.Tensor]
    """time(block, g, attn=None): the block over every view row (T frames of one camera), dynamic context."""
    temb: torch.Tensor
    """[B, width] flow-time embedding (the sync layers' modulation)."""


@dataclass(frozen=True)
class SyncVariant:
    """One synchronization variant: the trainable layers it adds to the model and what one layer does.

    Adding a variant is one ``SYNCS`` entry: its layer step, and for a trained one a ``build`` returning an
    ``nn.ModuleList`` stored as ``FourDModel.<attr>`` (the attribute names its state-dict keys, so shipped
    checkpoints keep loading) and the FLOPs its layers add per token.
    """
    step: Callable[["FourDModel", int, nn.Module, torch.Tensor, torch.Tensor, Passes],
                   tuple[torch.Tensor, torch.Tensor]]
    """(model, layer index, base block, x^v, x^t, passes) -> the next layer's (x^v, x^t)."""
    attr: str = ""
    """FourDModel attribute holding the trainable layers ("" = parameter-free, nothing to train)."""
    build: Callable[[VideoDiT, "FourDConfig"], nn.ModuleList] | None = None
    compile_layers: bool = False
    """torch.compile each of its layers with the base blocks (small fused GEMMs gain; copied attention is
    compiled through the block that runs it)."""
    flops_per_token: Callable[[int], float] = lambda width: 0.0
    """Forward FLOPs its sync layer adds per token and layer, given the model width."""

    @property
    def trained(self) -> bool:
        return bool(self.attr)


def _sequential(model: "FourDModel", l: int, block: nn.Module, xv: torch.Tensor, xt: torch.Tensor,
                p: Passes) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: the view pass, then the time pass, in one stream (the copied time attention if trained)."""
    attn = model.time_attn[l] if model.time_attn is not None else None
    x = p.time(block, p.view(block, xv), attn)
    return x, x


def _soft(model: "FourDModel", l: int, block: nn.Module, xv: torch.Tensor, xt: torch.Tensor,
          p: Passes) -> tuple[torch.Tensor, torch.Tensor]:
    yv, yt = p.view(block, xv), p.time(block, xt)  # Eq. 4, independent and parallel
    return model.soft[l](yv, yt, p.temb)


def _hard(model: "FourDModel", l: int, block: nn.Module, xv: torch.Tensor, xt: torch.Tensor,
          p: Passes) -> tuple[torch.Tensor, torch.Tensor]:
    yv, yt = p.view(block, xv), p.time(block, xt)
    x = model.hard[l](yv, yt, p.temb)
    return x, x


def _train_free_hard(model: "FourDModel", l: int, block: nn.Module, xv: torch.Tensor, xt: torch.Tensor,
                     p: Passes) -> tuple[torch.Tensor, torch.Tensor]:
    yv, yt = p.view(block, xv), p.time(block, xt)
    x = 0.5 * (yv + yt)  # Eq. 12
    return x, x


def _train_free_soft(model: "FourDModel", l: int, block: nn.Module, xv: torch.Tensor, xt: torch.Tensor,
                     p: Passes) -> tuple[torch.Tensor, torch.Tensor]:
    yv, yt = p.view(block, xv), p.time(block, xt)
    w = schedule_weight(l, len(model.base.blocks))  # Eq. 13
    return (1 - w) * yv + w * yt, (1 - w) * yt + w * yv


def _build_soft(base: VideoDiT, cfg: "FourDConfig") -> nn.ModuleList:
    depth = base.cfg.depth
    return nn.ModuleList(SoftSync(base.cfg.width, None if cfg.soft_init == "zero" else schedule_weight(l, depth))
                         for l in range(depth))


SYNCS: dict[str, SyncVariant] = {
    "soft": SyncVariant(_soft, "soft", _build_soft, compile_layers=True,
                        flops_per_token=lambda w: 2.0 * (2 * w) ** 2),  # one 2w x 2w map
    "hard": SyncVariant(_hard, "hard", lambda base, cfg: nn.ModuleList(
        HardSync(base.cfg.width, full=True) for _ in base.blocks), compile_layers=True,
                        flops_per_token=lambda w: 2.0 * 2 * w ** 2),  # two w x w maps
    "hard_channel": SyncVariant(_hard, "hard", lambda base, cfg: nn.ModuleList(
        HardSync(base.cfg.width, full=False) for _ in base.blocks), compile_layers=True),
    "sequential": SyncVariant(_sequential, "time_attn", lambda base, cfg: nn.ModuleList(
        copy.deepcopy(b.attn).requires_grad_(True) for b in base.blocks)),
    "train_free_hard": SyncVariant(_train_free_hard),
    "train_free_soft": SyncVariant(_train_free_soft),
    "train_free_sequential": SyncVariant(_sequential),
}
"""Every synchronization variant by name: the one place a variant is defined (docs/extending.md)."""
SYNC_VARIANTS = tuple(SYNCS)
TRAINED_SYNC_VARIANTS = tuple(k for k, v in SYNCS.items() if v.trained)
"""The variants with synchronization parameters to train (the others run on a base checkpoint as they are)."""
TRAIN_FREE_SYNC_VARIANTS = tuple(k for k, v in SYNCS.items() if not v.trained)
"""The variants without trained parameters (Eqs. 12-13 and sequential): any base checkpoint runs them."""


class FourDModel(nn.Module):
    """Velocity model over grids [B, V, T, C, H, W] built on a frozen VideoDiT."""

    def __init__(self, base: VideoDiT, cfg: FourDConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FourDConfig()
        self.base = base
        base.requires_grad_(False)
        self.soft = self.hard = self.time_attn = None  # the variant's layers take one of these names
        if self.variant.build is not None:
            setattr(self, self.variant.attr, self.variant.build(base, cfg))

    @property
    def variant(self) -> SyncVariant:
        """The registry entry of ``cfg.sync`` (looked up, not stored: the model stays picklable)."""
        return SYNCS[self.cfg.sync]

    def sync_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (everything of the base model stays frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def compile_blocks(self, tune: bool = False, **kwargs) -> None:
        """torch.compile the base blocks and the sync layers in place (``tune``: model.dit.TUNED_COMPILE)."""
        self.base.compile_blocks(tune, **kwargs)
        if self.variant.compile_layers:
            for layer in getattr(self, self.variant.attr):
                layer.compile(**compile_kwargs(tune, kwargs))

    def train(self, mode: bool = True) -> "FourDModel":
        super().train(mode)
        self.base.eval()  # frozen: the base never switches to training behaviour (requires_grad stays off by __init__)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None,
                return_streams: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity for a noisy grid x [B, V, T, C, H, W]; cond/mask mark the given (clean) frames."""
        base = self.base
        if x.dim() != 6:
            raise ValueError(f"x must be a grid [B, V, T, C, H, W], got shape {tuple(x.shape)}")
        B, V, T, C, H, W = x.shape
        if mask is not None and tuple(mask.shape) != (B, V, T):
            raise ValueError(f"mask must be [B, V, T] = {(B, V, T)}, got {tuple(mask.shape)}")
        if t.shape != (B,):
            raise ValueError(f"t must be [B] = ({B},), got {tuple(t.shape)}")
        p = base.cfg.patch_size
        hp, wp = H // p, W // p
        n = hp * wp
        tokens = base.embed(x.flatten(1, 2), None if cond is None else cond.flatten(1, 2),
                            None if mask is None else mask.flatten(1, 2))
        grid = tokens.view(B, V, T, n, -1)
        d = grid.shape[-1]

        c_view = base.time_context_embedding(t, torch.full_like(t, CONTEXT_FREEZE_TIME, dtype=torch.long), text,
                                            text_mask)
        c_time = base.time_context_embedding(t, torch.full_like(t, CONTEXT_DYNAMIC, dtype=torch.long), text, text_mask)
        temb = base.time_embedding(t)
        rope_view = base.rope(V, hp, wp, x.device)
        rope_time = base.rope(T, hp, wp, x.device)
        c_view_seq = c_view.repeat_interleave(T, dim=0)  # one sequence per (b, t) column
        c_time_seq = c_time.repeat_interleave(V, dim=0)  # one sequence per (b, v) row

        def view_pass(block: nn.Module, g: torch.Tensor) -> torch.Tensor:
            # (b t) (v n) d: a free view when g lies time column outermost, as this pass returns it.
            s = base.run_block(block, g.transpose(1, 2).reshape(B * T, V * n, d), c_view_seq, rope_view)
            return s.reshape(B, T, V, n, d).transpose(1, 2)

        def time_pass(block: nn.Module, g: torch.Tensor, attn: nn.Module | None = None) -> torch.Tensor:
            s = base.run_block(block, g.reshape(B * V, T * n, d), c_time_seq, rope_time, attn)
            return s.view(B, V, T, n, d)

        passes = Passes(view_pass, time_pass, temb)
        xv = xt = grid
        for l, block in enumerate(base.blocks):
            xv, xt = self.variant.step(self, l, block, xv, xt, passes)

        out_view = base.final(xv.reshape(B, V * T, n, d), c_view, H, W).reshape(B, V, T, C, H, W)
        out_time = base.final(xt.reshape(B, V * T, n, d), c_time, H, W).reshape(B, V, T, C, H, W)
        if return_streams:
            return out_view, out_time
        return 0.5 * (out_view + out_time)

    def _flops(self, views: int, frames: int, height: int, width: int) -> dict[str, float]:
        bc = self.base.cfg
        p = bc.patch_size
        n = (height // p) * (width // p)
        tokens = views * frames * n
        lin_v, att_v = block_flops(bc.width, bc.mlp_hidden, views * n, frames)  # view stream: T columns of V frames
        lin_t, att_t = block_flops(bc.width, bc.mlp_hidden, frames * n, views)  # time stream: V rows of T frames
        sync = tokens * self.variant.flops_per_token(bc.width)
        io = 2 * tokens * bc.width * p * p * (bc.in_channels + 1) + 2 * 2 * tokens * bc.width * p * p * bc.in_channels
        return {"frozen_matmul": bc.depth * (lin_v + lin_t) + io, "attention": bc.depth * (att_v + att_t),
                "sync": bc.depth * sync}

    def flops_per_sample(self, views: int, frames: int, height: int, width: int) -> float:
        """Forward FLOPs for one V x T grid: both streams through every block, the sync layers, embed and final."""
        return sum(self._flops(views, frames, height, width).values())

    def train_flops_per_sample(self, views: int, frames: int, height: int, width: int) -> float:
        """Training-step FLOPs for one grid with the base frozen.

        Frozen GEMMs need only the input gradient in the backward pass (1x forward),
        attention's backward is counted at 2x its forward, and the trainable sync layers
        at 2x (input and weight gradients): 2 F_frozen + 3 F_attention + 3 F_sync.
        """
        f = self._flops(views, frames, height, width)
        return 2 * f["frozen_matmul"] + 3 * f["attention"] + 3 * f["sync"]


def grid_condition_mask(batch: int, views: int, frames: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[B, V, T] mask with the first row (the fixed-view video) and first column (the freeze-time video) given."""
    mask = torch.zeros(batch, views, frames, device=device)
    mask[:, 0, :] = 1
    mask[:, :, 0] = 1
    return mask
