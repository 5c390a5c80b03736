"""The render rig's default arc is the measured one: its per-view image step is one the pseudo-4D data shows."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.affine import TransformConfig
from pipelines.render_objaverse import PRESETS, RenderJobConfig
from rendering.cameras import CircleRig, fit_distance
from rendering.settings import RenderSettings
from pipelines.view_step import (ARC_CANDIDATES, box_surface, choose_arc, pseudo4d_range, pseudo4d_steps, rig_step,
                                 rig_steps)


@pytest.fixture(scope="module")
def measured() -> tuple[dict[float, float], float, float]:
    cfg = RenderJobConfig()
    steps = {arc: rig_step(arc, cfg.views, cfg.elevation, cfg.fov, cfg.width, cfg.height, "box")
             for arc in ARC_CANDIDATES}
    lo, hi = pseudo4d_range(cfg.views, cfg.width, cfg.height)
    return steps, lo, hi


def test_default_arc_is_the_measured_choice(measured):
    steps, lo, hi = measured
    chosen = choose_arc(steps, lo, hi)
    assert RenderJobConfig().arc == chosen == RenderSettings().arc
    for name in PRESETS:  # RenderJobConfig() above is what a run without --preset gets
        assert PRESETS[name]().arc == chosen, name
    # The chosen arc's step is inside the pseudo-4D band, and the next wider candidate's is not.
    assert lo <= steps[chosen] <= hi
    wider = [a for a in ARC_CANDIDATES if a > chosen]
    assert wider and steps[min(wider)] > hi


def test_steps_grow_with_the_arc_and_the_full_circle_is_far_out(measured):
    steps, lo, hi = measured
    ordered = [steps[a] for a in sorted(ARC_CANDIDATES)]
    assert all(a < b for a, b in zip(ordered, ordered[1:]))
    # 45 degrees per view (8 views on 360) is several times anything the pseudo-4D grids show.
    assert steps[360.0] > 3 * hi
    assert 0 < lo < hi < 0.05


def test_pseudo4d_step_matches_its_definition():
    # A pure pan of p * width over V - 1 steps moves every pixel by p / (V - 1) of the width per view.
    pan = pseudo4d_steps(8, 256, 144, draws=5, transform=TransformConfig(family="pan", pan=0.14, min_strength=1.0))
    np.testing.assert_allclose(pan, 0.14 / 7, rtol=1e-9)
    zoom = pseudo4d_steps(8, 256, 144, draws=20, transform=TransformConfig(family="zoom", min_strength=1.0))
    assert (zoom > 0).all() and (zoom < pan[0]).all()


def test_rig_step_of_a_point_on_the_axis_is_zero_and_scales_with_the_arc():
    rig = CircleRig(8, 20.0, fit_distance(40.0, 256, 144), 40.0, 0.0, 60.0)
    assert rig_steps(rig, 256, 144, np.zeros((1, 3))) == pytest.approx(np.zeros(7), abs=1e-9)
    pts, normals = box_surface()
    half = rig_steps(CircleRig(8, 20.0, rig.distance, 40.0, 0.0, 30.0), 256, 144, pts, normals).mean()
    full = rig_steps(rig, 256, 144, pts, normals).mean()
    assert 1.8 < full / half < 2.2
