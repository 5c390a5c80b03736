"""What renders badly, and why: the render job's sample filters (issue 14).

Every rendered sample is measured from its RGBA frames in the Ray actor, right after Blender hands them back;
each filter compares one measured value with its threshold (the render job's ``filter_*`` options). The filters
run in ``FILTERS``' order and the first that trips is the sample's reason, recorded in its meta.json (``filter``:
the reason and every measured value) and in index.parquet (``filtered``; empty = kept). A filtered sample is
still written, so it can be looked at and, with the training option ``data.keep_filtered``, trained on; the
training loader skips it otherwise. The render job's summary counts what each step dropped (``funnel``).

Adding a filter is one ``FILTERS`` entry (docs/extending.md), plus the option its threshold reads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from pipelines.common.shards import FILTER_META

ANALYSIS_SIZE = 64
"""Side of the square two frames are resized to before they are compared: the score then depends on what the
object does, not on the render size (the tests' 18 x 32 frames and the paper's 144 x 256 score alike). Of 16,
24, 32, 48 and 64, 64 kept normal fast motion furthest above torn meshes (docs/rendering.md)."""


def coverage(frames: np.ndarray) -> float:
    """The least share of an image the object covers (mean alpha, 0..1) over every view and time of
    ``frames`` (uint8 [V, T, H, W, 4])."""
    alpha = frames[..., 3].reshape(frames.shape[0] * frames.shape[1], -1)
    return float(alpha.mean(axis=1).min() / 255.0)


def border_alpha(frames: np.ndarray, band: int) -> float:
    """The largest alpha (0..1) within ``band`` pixels of the image's edge over every view and time: an object
    cut by the frame shows there (normalization fits the action into the view, so this catches what it missed
    and cameras set closer with --distance)."""
    a = frames[..., 3]
    edges = [a[..., :band, :], a[..., -band:, :], a[..., :, :band], a[..., :, -band:]]
    return float(max(e.max() for e in edges) / 255.0)


def _object_box(first: np.ndarray, second: np.ndarray, level: float) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the square around the pixels that show the object (alpha above ``level``)
    in either frame, a fifth larger than their box; it may reach past the image. None when neither frame
    shows the object. Square, so resizing keeps the object's shape (a tight box would stretch a thin object
    across the whole analysis square)."""
    shown = (first[..., 3] > level * 255) | (second[..., 3] > level * 255)
    if not shown.any():
        return None
    ys, xs = np.nonzero(shown)
    side = 1.2 * max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    top, left = int(np.floor(cy - side / 2)), int(np.floor(cx - side / 2))
    return top, int(np.ceil(cy + side / 2)), left, int(np.ceil(cx + side / 2))


def similarity(first: np.ndarray, second: np.ndarray, level: float) -> float:
    """SSIM (``pipelines.eval_metrics.ssim``) of two RGBA frames (uint8 [H, W, 4]) where the object is.

    Each frame is composited over black (so the score cannot depend on a background) with its alpha as a fourth
    channel (so an object as dark as that black still counts), cut to the square the object occupies in either
    frame and resized to ``ANALYSIS_SIZE``. The cut matters: over the whole image the empty background,
    identical in both frames, would dominate the score and hide what the object does. Two frames without the
    object are alike (1.0).
    """
    import torch
    import torch.nn.functional as F

    from pipelines.eval_metrics import ssim
    box = _object_box(first, second, level)
    if box is None:
        return 1.0
    top, bottom, left, right = box
    h, w = first.shape[:2]

    def prepare(frame: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frame.astype(np.float64) / 255).permute(2, 0, 1)
        x = torch.cat([x[:3] * x[3:], x[3:]])  # premultiplied colour = composited over black, then alpha
        square = torch.zeros(4, bottom - top, right - left, dtype=x.dtype)  # past the image: nothing shown
        y0, y1, x0, x1 = max(0, top), min(h, bottom), max(0, left), min(w, right)
        square[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
        return F.interpolate(square[None], size=(ANALYSIS_SIZE, ANALYSIS_SIZE), mode="bilinear", antialias=True,
                             align_corners=False)[0]
    return float(ssim(prepare(first), prepare(second)))


def static_similarity(frames: np.ndarray, early: int, level: float) -> float | None:
    """How alike the front view's (view 0) first ``early`` frames stay to its frame 0: the least similarity of
    any of them to it. None with a single frame (nothing to compare)."""
    row = frames[0, :early]
    if len(row) < 2:
        return None
    return min(similarity(row[0], row[t], level) for t in range(1, len(row)))


def step_similarity(frames: np.ndarray, early: int, level: float) -> float | None:
    """How alike consecutive frames of the front view's first ``early`` are: the mean similarity of a frame to
    the one before it. The mean, not the least: normal fast motion has a fastest step, a torn or flickering
    object differs at every step (the least of normal procedural motion came within 0.09 of torn meshes, the
    mean stays 0.2 above them; docs/rendering.md). None with a single frame."""
    row = frames[0, :early]
    if len(row) < 2:
        return None
    return float(np.mean([similarity(row[t - 1], row[t], level) for t in range(1, len(row))]))


@dataclass(frozen=True)
class RenderFilter:
    """One way a render can be bad: what is measured, and when it counts as bad. The options are the render
    job's config (``pipelines.render_objaverse.RenderJobConfig``: its ``filter_*`` fields)."""

    value: str
    """Name of the measured value in meta.json's ``filter`` record."""
    measure: Callable[[np.ndarray, Any], float | None]
    """(frames uint8 [V, T, H, W, 4], options) -> the value; None when this sample cannot be judged."""
    trips: Callable[[float, Any], bool]
    """(value, options) -> True when the sample is bad this way."""
    about: str
    """What it catches, in a few words (--help, docs)."""


FILTERS: dict[str, RenderFilter] = {
    # Per-frame checks first: a frame that shows nothing, or an object cut by the frame, is bad whatever the
    # motion; the motion checks judge what is left.
    "empty": RenderFilter("coverage", lambda f, o: coverage(f), lambda x, o: x < o.filter_min_coverage,
                          "a frame (any view, any time) where the object covers almost nothing"),
    "leaves_frame": RenderFilter("border_alpha", lambda f, o: border_alpha(f, o.filter_border_px),
                                 lambda x, o: x > o.filter_alpha, "the object reaches the image's edge in a frame"),
    "static": RenderFilter("static_similarity", lambda f, o: static_similarity(f, o.filter_frames, o.filter_alpha),
                           lambda x, o: x > o.filter_static_similarity,
                           "the front view's early frames all look like its first: nothing visibly moves"),
    "distorted": RenderFilter("step_similarity", lambda f, o: step_similarity(f, o.filter_frames, o.filter_alpha),
                              lambda x, o: x < o.filter_distorted_similarity,
                              "consecutive early frames of the front view share little, step after step: a torn, "
                              "flickering or jumping object"),
}
"""Every render filter by name, in the order they apply (the render job's --filters picks which run)."""

FILTER_NAMES = tuple(FILTERS)
"""The filters' names when this module loads: the choices of the training option data.keep_filtered."""


def decode_frames(files: dict[str, bytes]) -> np.ndarray | None:
    """A render sample's colour frames (members ``vVVtTT.png``; depth and normal passes left out) as uint8
    [V, T, H, W, 4]; None when it has none."""
    from PIL import Image
    names = sorted(k for k in files if len(k) == 10 and k[0] == "v" and k[3] == "t" and k.endswith(".png"))
    if not names:
        return None
    views, times = sorted({int(n[1:3]) for n in names}), sorted({int(n[4:6]) for n in names})
    return np.stack([np.stack([np.asarray(Image.open(io.BytesIO(files[f"v{v:02d}t{t:02d}.png"])).convert("RGBA"))
                               for t in times]) for v in views])


def judge(frames: np.ndarray, options: Any) -> dict[str, Any]:
    """The ``filter`` record of a sample: ``filtered`` (the first of the enabled filters, ``options.filters``,
    that trips, in ``FILTERS``' order; empty when none does) and every enabled filter's measured value."""
    record: dict[str, Any] = {"filtered": ""}
    for name in FILTERS:
        if name not in options.filters:
            continue
        f = FILTERS[name]
        value = f.measure(frames, options)
        record[f.value] = None if value is None else round(value, 5)
        if value is not None and not record["filtered"] and f.trips(value, options):
            record["filtered"] = name
    return record


def mark(meta: dict[str, Any], files: dict[str, bytes], options: Any) -> str:
    """Measure a rendered sample and record the outcome in its meta (``meta[FILTER_META]``); returns the reason
    (empty = kept). Nothing is recorded when no filter is enabled, or the sample has no frames to measure."""
    frames = decode_frames(files) if options.filters else None
    if frames is None:
        return ""
    meta[FILTER_META] = judge(frames, options)
    return meta[FILTER_META]["filtered"]


def funnel(reasons: Iterable[str], order: Iterable[str]) -> dict[str, Any]:
    """What each filter step dropped, from the samples' recorded reasons (empty = kept): per step, in ``order``,
    the samples ``entering`` it (those no earlier step dropped), how many it ``dropped`` and their ``share`` of
    those entering; then how many are ``kept``. A reason outside ``order`` (an output filtered with other
    options) gets a step of its own after them."""
    counts: dict[str, int] = {}
    total = 0
    for r in reasons:
        total += 1
        if r:
            counts[r] = counts.get(r, 0) + 1
    steps: dict[str, dict[str, Any]] = {}
    entering = total
    for name in list(order) + sorted(set(counts) - set(order)):
        dropped = counts.get(name, 0)
        steps[name] = {"entering": entering, "dropped": dropped,
                       "share": round(dropped / entering, 4) if entering else 0.0}
        entering -= dropped
    return {"steps": steps, "kept": entering, "kept_share": round(entering / total, 4) if total else 0.0}


def describe_funnel(f: dict[str, Any]) -> str:
    """One line of ``funnel``'s counts, e.g. ``empty 1/5 (20%), static 0/4 (0%); kept 4``."""
    steps = ", ".join(f"{name} {s['dropped']}/{s['entering']} ({100 * s['share']:.0f}%)"
                      for name, s in f["steps"].items())
    return f"{steps or 'none'}; kept {f['kept']}"
