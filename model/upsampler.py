"""Diffusion video super-resolution x4 (paper section 4.1: 72x128 -> 288x512).

The upsampler is a pixel-space VideoDiT whose every frame also sees the low-res
frame, bilinearly upsampled x4, as extra input channels; it predicts the rectified
flow velocity of the high-res clip. Long inputs (a whole 8x8 grid) are cut into
clips of ``clip_frames`` frames that attend jointly and are sampled ``batch_clips``
at a time, so memory stays bounded whatever the number of frames.

Train/test gap (cascaded diffusion, Ho et al. 2021): training pairs come from
box-filtered ground truth, but at test time the low-res frames are generated and
carry the 4D model's artefacts. So the condition is noise-augmented, z = (1 - s)
lowres + s eps, with the level s drawn per training sample and given to the model
(an embedding added to the DiT's adaLN vector); sampling applies a small fixed level.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import rectified_flow as rf
from model.dit import DiTConfig, TimestepEmbedder, VideoDiT


@dataclass
class UpsamplerConfig:
    patch_size: int = 8
    """Pixel patch side at the high resolution."""
    width: int = 768
    """Token channels."""
    depth: int = 12
    """Transformer blocks."""
    heads: int = 6
    """Attention heads (head size a multiple of 16)."""
    mlp_ratio: float = 4.5
    """SwiGLU hidden size as a multiple of width."""
    in_channels: int = 3
    """Channels per frame."""
    qk_norm: bool = True
    """RMS-normalise queries and keys."""
    clip_frames: int = 8
    """Frames attended jointly (one grid row of the 8x8 grid); longer inputs are cut into clips."""
    batch_clips: int = 8
    """Clips sampled together by ``upsample`` (bounds peak memory)."""
    steps: int = 10
    """Default sampling steps of ``upsample`` (saved with the model; generation and evaluation use it unless
    told otherwise). Few steps keep more of the network's mean estimate, many add more invented detail: the
    proof upsampler's SSIM against the truth peaks at 2 (validation clips, docs/results.md, run 6)."""
    checkpointing: bool = False
    """Recompute block activations in the backward pass."""
    aug_max: float = 0.3
    """Largest noise-augmentation level s of the low-res condition in training (z = (1 - s) lowres + s eps).
    Training sees clean box-filtered frames, generation sees generated ones; a corrupted condition whose level
    the model is told teaches it to treat low-res detail as evidence, not as pixels to copy. Kept well below 1 so
    the condition always carries the layout."""
    aug_prob: float = 0.5
    """Chance per training sample that the condition is augmented (level uniform in [0, aug_max]); the rest
    see the clean condition at level 0, so the model still learns to use a faithful one fully."""
    sample_aug_level: float = 0.1
    """Level ``upsample`` applies by default: small, so most of the generated frames' detail survives, but not
    zero, so their artefacts look like the corruption seen in training. 0 for a model trained without it."""
    prediction: str = "x"
    """What the network outputs: "x", the clean high-res clip, turned into the velocity (x_t - x) / t; or "v",
    the velocity itself. A pixel-space patch holds patch_size^2 x 3 values (192 at patch 8), more than a small
    model's width: a velocity carries the full-resolution noise, which such a token cannot represent, so a
    v-predicting proof upsampler plateaued at a third of the initial loss and sampled images covered in noise
    (docs/results.md, run 2). A clean image is low-dimensional and smooth, so x-prediction fits through the
    same bottleneck (Li and He 2025, "Back to Basics: Let Denoising Generative Models Denoise")."""
    residual: bool = True
    """x-prediction only ("v" models ignore it: a velocity has no bicubic part): the clip is the bicubic
    upsampling of the condition (see ``residual_base``) plus the network's output, which starts at
    zero. So the untrained model is bicubic of its condition, and training adds only what bicubic misses.
    Predicting the whole clip made the proof upsampler's best single-step estimate worse than bicubic (21 dB
    against 25 dB, docs/results.md, run 4): its width went on re-drawing the low frequencies."""
    residual_base: str = "clean"
    """What the residual adds to: "clean", the bicubic upsampling of the condition before noise augmentation
    (the callers hold it: training has the box-filtered truth, ``upsample`` the frames it was given); or
    "condition", of the augmented condition the network sees (run 4's upsampler). Adding bicubic of the
    augmented condition put its noise, upsampled into blotches, and its (1 - s) contrast loss into every
    output, which the network then had to learn to subtract; the proof upsampler trained that way sampled
    grainy frames with SSIM 0.47 against bicubic's 0.76 (docs/results.md, run 4)."""
    x_pred_min_t: float = 0.05
    """Smallest t in the x-to-velocity division (x_t - x) / t: keeps the velocity, and the loss it enters,
    bounded near the data end of the path."""
    precond: str = "edm"
    """Residual x-prediction only: "edm", the residual is c_skip(t) z + c_out(t) F with z = x_t - (1 - t) bicubic
    the noisy residual and F the network (Karras et al. 2022, EDM, written for the rectified-flow path); or
    "none", the residual is F (runs 4, 5). Near the data end the residual is almost all in z, and without the
    skip the network must carry z's full-resolution detail through its patch bottleneck (192 values into 128
    channels at the proof size); the weight 1/t^2 of those times in the velocity loss then spends the
    network on that copy. Run 5's upsampler, trained so, estimated worse than bicubic even on its own
    training clips (docs/results.md, run 6). With the skip, copying z is free, F starts at zero as a
    unit-variance correction, and the untrained model is the Wiener estimate of the residual."""
    residual_std: float = 0.1
    """EDM's sigma_data for the residual (truth minus bicubic of its 4x box filter), in the [-1, 1] pixel scale;
    measured 0.08-0.12 on the procedural clips. Sets how much of z the skip keeps at each t."""
    head_channels: int = 0
    """Channels of a small convolutional head at the full resolution (0: none). It sees, per frame, the noisy
    clip, the bicubic base and the transformer's output, and adds a correction to the latter: local detail a
    patch-8 token cannot draw (the super-resolution nets of the field are convolutional for this reason). Its
    last layer starts at zero, so a model with a head starts as the model without."""
    head_layers: int = 3
    """Convolutions of that head (3x3 each, FiLM-conditioned on t); at least 2."""

    def dit(self) -> DiTConfig:
        return DiTConfig(patch_size=self.patch_size, width=self.width, depth=self.depth, heads=self.heads,
                         mlp_ratio=self.mlp_ratio, in_channels=self.in_channels, num_contexts=1,
                         pixel_cond_channels=self.in_channels, qk_norm=self.qk_norm,
                         checkpointing=self.checkpointing)


UPSAMPLER_PRESETS: dict[str, UpsamplerConfig] = {
    "tiny": UpsamplerConfig(patch_size=4, width=32, depth=2, heads=2, mlp_ratio=2.0, clip_frames=4, batch_clips=4,
                            steps=2),
    # The GPU proof run: 64x64 -> 256x256, 4-frame clips of 32x32 tokens and a 48-channel convolutional head,
    # ~1.5M parameters (docs/results.md).
    "proof": UpsamplerConfig(patch_size=8, width=128, depth=4, heads=2, mlp_ratio=2.5, clip_frames=4, batch_clips=16,
                             head_channels=48, head_layers=4, steps=2),
    # small and paper sample in 2 steps, as the proof upsampler does: on its validation clips 2 steps beat
    # bicubic on PSNR, SSIM and sharpness where more steps added guessed detail (docs/results.md, run 6), and
    # they make 8x8 at 288x512 a 1.5 s generation instead of 6.8 s (docs/performance.md)
    "small": UpsamplerConfig(patch_size=8, width=384, depth=8, heads=6, steps=2),
    # 8x8 grid at 288x512: 8 clips of 8 frames x 2304 tokens, ~150 M parameters; fits an 80 GB GPU in bf16.
    "paper": UpsamplerConfig(patch_size=8, width=768, depth=12, heads=6, steps=2),
}


def upsampler_config(preset: str, **overrides) -> UpsamplerConfig:
    if preset not in UPSAMPLER_PRESETS:
        raise ValueError(f"unknown upsampler preset {preset!r}; choose one of {sorted(UPSAMPLER_PRESETS)}")
    return replace(UPSAMPLER_PRESETS[preset], **overrides)


PREDICTIONS = ("x", "v")
RESIDUAL_BASES = ("clean", "condition")
PRECONDS = ("edm", "none")


def upsampler_from_config(model_config: dict) -> "VideoUpsampler":
    """The upsampler a checkpoint's ``model_config`` describes. Checkpoints from before ``prediction`` existed
    hold v-predicting models, so a missing field means "v", not today's default; likewise a missing
    ``residual`` means a model that predicts the whole clip, a missing ``residual_base`` one whose residual
    adds to the augmented condition, and a missing ``precond`` one without the skip."""
    legacy = {"prediction": "v", "residual": False, "residual_base": "condition", "precond": "none"}
    return VideoUpsampler(UpsamplerConfig(**{**legacy, **model_config}))


class VideoUpsampler(nn.Module):
    scale = 4

    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {cfg.prediction!r}")
        if cfg.residual_base not in RESIDUAL_BASES:
            raise ValueError(f"residual_base must be one of {RESIDUAL_BASES}, got {cfg.residual_base!r}")
        for name in ("aug_max", "aug_prob", "sample_aug_level"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
        if cfg.precond not in PRECONDS:
            raise ValueError(f"precond must be one of {PRECONDS}, got {cfg.precond!r}")
        if cfg.residual_std <= 0:
            raise ValueError(f"residual_std must be > 0, got {cfg.residual_std}")
        if cfg.head_channels and cfg.prediction != "x":
            raise ValueError("head_channels needs prediction='x': the head corrects a clean-clip estimate")
        if cfg.head_channels < 0 or (cfg.head_channels and cfg.head_layers < 2):
            raise ValueError(f"head_channels must be >= 0 and head_layers >= 2, got {cfg.head_channels}, "
                             f"{cfg.head_layers}")
        self.cfg = cfg = replace(cfg)  # own copy: loading a pre-augmentation checkpoint changes sample_aug_level
        self.dit = VideoDiT(cfg.dit())
        self.head = ConvHead(cfg.in_channels, cfg.head_channels, cfg.head_layers) if cfg.head_channels else None
        # The augmentation level's embedding lives here, not in the DiT, so the DiT's parameter names (and
        # checkpoints) stay as they are; it reaches the blocks through VideoDiT's extra_cond.
        self.aug_embed = TimestepEmbedder(cfg.width)
        for m in self.aug_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Zero output layer: an un-augmented model starts identical to the plain DiT; the gradient still
        # reaches this layer (it is the product of dL/dc and the first layer's non-zero activations).
        nn.init.zeros_(self.aug_embed.mlp[-1].weight)
        self.register_load_state_dict_pre_hook(_fill_missing_aug_embed)

    def upsample_input(self, lowres: torch.Tensor) -> torch.Tensor:
        B, Fr, C, h, w = lowres.shape
        up = F.interpolate(lowres.flatten(0, 1), scale_factor=self.scale, mode="bilinear", align_corners=False)
        return up.view(B, Fr, C, h * self.scale, w * self.scale)

    def forward(self, x_hr_noisy: torch.Tensor, t: torch.Tensor, lowres: torch.Tensor,
                aug_level: torch.Tensor | None = None, clean: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity [B, F, C, H, W] of the high-res clip given the low-res clip [B, F, C, H/4, W/4].

        ``aug_level`` [B] is the noise-augmentation level s that ``lowres`` was already corrupted with by
        ``corrupt_lowres`` (None: a clean condition, s = 0); the callers corrupt, so that training and
        sampling share one path and the level the model is told is the one actually applied. ``clean`` is
        ``lowres`` before that corruption (None: ``lowres`` is clean): the residual's base when
        ``residual_base`` is "clean".
        """
        B, Fr, C, H, W = x_hr_noisy.shape
        want = (B, Fr, C, H // self.scale, W // self.scale)
        if tuple(lowres.shape) != want or H % self.scale or W % self.scale:
            raise ValueError(f"lowres must be {want} (x4 smaller than x_hr_noisy {tuple(x_hr_noisy.shape)}), "
                             f"got {tuple(lowres.shape)}")
        if aug_level is None:
            aug_level = torch.zeros(B, device=x_hr_noisy.device)
        if tuple(aug_level.shape) != (B,):
            raise ValueError(f"aug_level must be [B] = ({B},), got {tuple(aug_level.shape)}")
        context = torch.zeros(B, dtype=torch.long, device=x_hr_noisy.device)
        out = self.dit(x_hr_noisy, t, context, pixels=self.upsample_input(lowres), extra_cond=self.aug_embed(aug_level))
        if self.cfg.prediction == "v":
            return out
        # x-prediction: the network's output is the clean clip (or what bicubic misses of it); the sampler and
        # the loss work in velocities.
        base = None
        if self.cfg.residual:
            base = lowres if clean is None or self.cfg.residual_base == "condition" else clean
            if tuple(base.shape) != want:
                raise ValueError(f"clean must be the shape of lowres {want}, got {tuple(base.shape)}")
            base = self.bicubic(base)
        if self.head is not None:
            out = out.float() + self.head(x_hr_noisy, base if base is not None else self.upsample_input(lowres),
                                          out, t)
        if base is not None:
            if self.cfg.precond == "edm":
                out = self.precondition(x_hr_noisy, base, out, t)
            out = out.float() + base
        return rf.velocity_from_x0(x_hr_noisy, out, t, self.cfg.x_pred_min_t)

    def precondition(self, x_t: torch.Tensor, base: torch.Tensor, net: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """EDM's c_skip z + c_out F for the residual r = x - base on the rectified-flow path.

        z = x_t - (1 - t) base = (1 - t) r + t eps is the noisy residual; with sigma = residual_std,
        c_skip = (1 - t) sigma^2 / ((1 - t)^2 sigma^2 + t^2) is the Wiener (least-squares linear) estimate of r
        from z and c_out = t sigma / sqrt((1 - t)^2 sigma^2 + t^2) the remaining error's scale, so F's target has
        unit variance at every t. In fp32: z is a small difference of large terms at small t.
        """
        tt = t.float().view(-1, *([1] * (x_t.dim() - 1)))
        sd = self.cfg.residual_std
        z = x_t.float() - (1 - tt) * base
        denom = (1 - tt) ** 2 * sd ** 2 + tt ** 2
        return (1 - tt) * sd ** 2 / denom * z + tt * sd / denom.sqrt() * net.float()

    def bicubic(self, lowres: torch.Tensor) -> torch.Tensor:
        """Plain x4 bicubic upsampling of [B, F, C, h, w] (fp32, clamped to the data range [-1, 1])."""
        B, Fr, C, h, w = lowres.shape
        up = F.interpolate(lowres.flatten(0, 1).float(), scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up.clamp(-1, 1).view(B, Fr, C, h * self.scale, w * self.scale)

    @staticmethod
    def corrupt_lowres(lowres: torch.Tensor, level: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = (1 - s) lowres + s eps per sample: the rectified-flow path, so s is the condition's flow time."""
        return rf.add_noise(lowres, eps, level)

    def sample_aug_levels(self, batch: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
        """Training levels [batch]: uniform in [0, aug_max] with probability aug_prob, else 0."""
        # Both draws always happen, so the rest of the step's random stream does not depend on aug_prob.
        level = torch.rand(batch, generator=generator, device=device) * self.cfg.aug_max
        on = torch.rand(batch, generator=generator, device=device) < self.cfg.aug_prob
        return torch.where(on, level, torch.zeros_like(level))

    def training_loss(self, hr: torch.Tensor, lowres: torch.Tensor, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Velocity-matching loss of hr [B, F, C, H, W] given the clean lowres, which is noise-augmented here.

        Every random draw (levels, condition noise, flow times, noise) comes from ``generator``, so a
        training step is reproducible from its seed.
        """
        level = self.sample_aug_levels(hr.shape[0], generator, hr.device)
        eps = torch.randn(lowres.shape, generator=generator, device=lowres.device, dtype=lowres.dtype)
        cond = self.corrupt_lowres(lowres, level, eps)
        loss, aux = rf.training_loss(lambda x, t, _cond, _mask: self(x, t, cond, level, lowres), hr, None, generator)
        aux["aug_level_mean"] = level.mean().detach()
        return loss, aux

    @torch.no_grad()
    def upsample(self, lowres: torch.Tensor, steps: int | None = None, method: str = "euler",
                 generator: torch.Generator | None = None, aug_level: float | None = None,
                 shared_noise: bool = True) -> torch.Tensor:
        """Sample the x4 video [B, F, C, 4h, 4w] for lowres [B, F, C, h, w], clip by clip.

        ``aug_level`` (None: ``cfg.sample_aug_level``, 0.1 by default) corrupts the condition as training
        does and tells the model that level: generated low-res frames are not the clean box-filtered frames
        of training, and a small level puts their artefacts inside what the model learnt to handle.

        ``shared_noise``: every clip of one length starts from the same noise (and the same condition
        corruption), one draw [1, length, C, H, W] for the whole batch. The 4D pipeline passes the rows of
        one grid (its views) as the batch; with independent noise per row each view gets its own invented
        high-frequency detail and neighbouring views flicker against each other, while a shared draw makes
        views that agree at low resolution agree at high resolution too. False: independent noise per clip
        (independent samples, e.g. of unrelated videos).
        """
        if lowres.dim() != 5:
            raise ValueError(f"lowres must be [B, F, C, h, w], got shape {tuple(lowres.shape)}")
        level = self.cfg.sample_aug_level if aug_level is None else float(aug_level)
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"aug_level must be in [0, 1], got {level}")
        B, Fr, C, h, w = lowres.shape
        H, W = h * self.scale, w * self.scale
        self.dit.check_frames(lowres.new_empty(0, 0, C, H, W), "upsampled lowres")
        steps = steps or self.cfg.steps
        clip = self.cfg.clip_frames

        def draw(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Initial noise [n, length, C, H, W] and condition noise [n, length, C, h, w] (None at level 0)."""
            kw = dict(generator=generator, device=lowres.device, dtype=lowres.dtype)
            noise = torch.randn((n, length, C, H, W), **kw)
            return noise, (torch.randn((n, length, C, h, w), **kw) if level > 0 else None)

        # (sample, first frame, length) of every clip; clips of one length are batched together.
        clips = [(b, f0, min(clip, Fr - f0)) for b in range(B) for f0 in range(0, Fr, clip)]
        out = lowres.new_empty(B, Fr, C, H, W)
        for length in sorted({c[2] for c in clips}):
            same = [c for c in clips if c[2] == length]
            shared = draw(1, length) if shared_noise else None  # once per length: the same for every group
            for i in range(0, len(same), self.cfg.batch_clips):
                group = same[i:i + self.cfg.batch_clips]
                n = len(group)
                lr = torch.stack([lowres[b, f0:f0 + length] for b, f0, _ in group])
                noise, eps = draw(n, length) if shared is None else (
                    shared[0].expand(n, -1, -1, -1, -1), None if shared[1] is None else shared[1].expand_as(lr))
                s = torch.full((n,), level, device=lowres.device)
                cond = lr if eps is None else self.corrupt_lowres(lr, s, eps)
                hr = rf.sample(lambda x, t, _cond, _mask: self(x, t, cond, s, lr), noise, steps, method)
                for (b, f0, _), frames in zip(group, hr):
                    out[b, f0:f0 + length] = frames
        return out.clamp(-1, 1)

    def flops_per_sample(self, frames: int, height: int, width: int) -> float:
        """Forward FLOPs for `frames` high-res frames, attention within clips of clip_frames.

        The level embedding is left out, as the DiT leaves out its time embedding: a few MLP rows per clip.
        """
        clip = self.cfg.clip_frames
        full, rest = divmod(frames, clip)
        total = full * self.dit.flops_per_sample(clip, height, width)
        total += self.dit.flops_per_sample(rest, height, width) if rest else 0.0
        if self.head is not None:  # 2 FLOPs per multiply-add of every 3x3 kernel at every pixel of every frame
            macs = sum(c.weight.numel() for c in (*self.head.convs, self.head.out))
            total += 2.0 * macs * height * width * frames
        return total

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ConvHead(nn.Module):
    """Per-frame 3x3 convolutions at the full resolution over [noisy clip, bicubic base, transformer output],
    FiLM-conditioned on the flow time; returns a correction to the transformer output (zero at init)."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 * channels, width, 3, padding=1)] +
                                   [nn.Conv2d(width, width, 3, padding=1) for _ in range(layers - 2)])
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.t_embed = TimestepEmbedder(width)
        self.film = nn.Linear(width, 2 * width * len(self.convs))
        nn.init.zeros_(self.film.weight)  # FiLM starts as the identity: scale 1 + 0, shift 0
        nn.init.zeros_(self.film.bias)

    def forward(self, x_t: torch.Tensor, base: torch.Tensor, net: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, Fr = x_t.shape[:2]
        dtype = self.out.weight.dtype
        h = torch.cat([x_t, base, net], dim=2).flatten(0, 1).to(dtype)
        film = self.film(F.silu(self.t_embed(t))).repeat_interleave(Fr, 0).to(dtype)
        for i, conv in enumerate(self.convs):
            scale, shift = film[:, 2 * i * conv.out_channels:(2 * i + 2) * conv.out_channels].chunk(2, dim=1)
            h = F.silu(conv(h) * (1 + scale[..., None, None]) + shift[..., None, None])
        return self.out(h).view(B, Fr, *net.shape[2:])


def _fill_missing_aug_embed(module: VideoUpsampler, state_dict: dict, prefix: str, *_) -> None:
    """Let checkpoints from before noise augmentation load (strictly) into the current module.

    Their model never saw a corrupted condition, so the level embedding gets a zero output layer (it
    then changes nothing) and sampling defaults to a clean condition.
    """
    key = prefix + "aug_embed."
    if not any(k.startswith(prefix + "dit.") for k in state_dict) or any(k.startswith(key) for k in state_dict):
        return
    last = f"mlp.{len(module.aug_embed.mlp) - 1}."
    for name, value in module.aug_embed.state_dict().items():
        state_dict[key + name] = torch.zeros_like(value) if name.startswith(last) else value.detach().clone()
    module.cfg.sample_aug_level = 0.0
