"""Sliding windows fill every cell exactly once, keep given cells bit-exact, condition like training."""

from __future__ import annotations

import pytest
import torch

from model.sliding_window import WINDOW_PLANS, fill_grid, plan_windows


@pytest.mark.parametrize("plan", sorted(WINDOW_PLANS))
@pytest.mark.parametrize("total,size,overlap", [(32, 8, 1), (16, 8, 2), (8, 8, 1), (5, 8, 1), (17, 8, 3), (16, 8, 1),
                                                (9, 8, 1), (100, 2, 1), (12, 5, 1), (64, 8, 1)])
def test_window_spans_cover_everything(plan: str, total: int, size: int, overlap: int) -> None:
    spans = WINDOW_PLANS[plan](total, size, overlap)
    covered = set()
    for (a, n), (b, _) in zip(spans, spans[1:]):
        shared = a + n - b
        assert shared == overlap if plan == "even" else shared >= overlap  # even: exactly what was asked
    for start, n in spans:
        assert n <= size and n > min(overlap, total - 1) and start + n <= total
        covered |= set(range(start, start + n))
    assert covered == set(range(total)) and spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == total
    if plan == "even":  # as few windows as full-size ones, their lengths within one of each other
        assert len(spans) == len(WINDOW_PLANS["flush"](total, size, overlap))
        assert max(n for _, n in spans) - min(n for _, n in spans) <= 1


@pytest.mark.parametrize("V,T", [(16, 16), (9, 17), (8, 11), (32, 8)])
def test_even_windows_keep_everything_they_generate(V: int, T: int) -> None:
    """With overlap 1 an even window's cells are its L-shape (known) and cells it keeps: nothing is generated
    and thrown away, so each kept frame continues the frames before it. Flush windows past the first along an
    axis regenerate known cells and discard them (the seam benchmarks/sliding_window_seams.py measures)."""
    unknown = V * T - (V + T - 1)

    def generated(plan: str) -> int:
        return sum(nv * nt - (nv + nt - 1) for _, _, nv, nt in plan_windows(V, T, 8, 8, plan=plan))
    assert generated("even") == unknown
    assert generated("flush") > unknown


@pytest.mark.parametrize("plan", sorted(WINDOW_PLANS))
@pytest.mark.parametrize("V,T,window,overlap", [(16, 32, (8, 8), (1, 1)), (10, 12, (4, 5), (2, 1)), (4, 4, (8, 8), (1, 1))])
def test_fill_grid_generates_each_cell_once(V: int, T: int, window: tuple[int, int], overlap: tuple[int, int],
                                            plan: str) -> None:
    torch.manual_seed(0)
    grid = torch.randn(1, V, T, 3, 2, 2)
    known = torch.zeros(1, V, T)
    known[:, 0, :] = 1
    known[:, :, 0] = 1
    seen_masks = []

    def generate(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen_masks.append(mask.clone())
        return torch.full_like(x, 7.0)

    out, count = fill_grid(grid, known, window, generate, overlap, plan)
    given = known[0].bool()
    assert torch.equal(out[0][given], grid[0][given])  # bit-exact
    assert (out[0][~given] == 7.0).all()
    assert count[given].sum() == 0 and (count[~given] == 1).all()
    for m in seen_masks:  # every window conditions on exactly its first row and column, as in training
        assert torch.equal(m, _l_shape(m))
    assert len(seen_masks) <= len(plan_windows(V, T, *[min(w, n) for w, n in zip(window, (V, T))], *overlap, plan=plan))
    assert all(m.shape[1] <= window[0] and m.shape[2] <= window[1] for m in seen_masks)


def _l_shape(like: torch.Tensor) -> torch.Tensor:
    m = torch.zeros_like(like)
    m[:, 0, :] = 1
    m[:, :, 0] = 1
    return m


@pytest.mark.parametrize("plan", sorted(WINDOW_PLANS))
@pytest.mark.parametrize("V,T,window,overlap", [(8, 11, (8, 8), (1, 1)), (11, 8, (8, 8), (1, 1)),
                                                (11, 11, (8, 8), (1, 1)), (9, 17, (8, 8), (1, 1)),
                                                (10, 12, (4, 5), (2, 2))])
def test_every_window_sees_the_trained_l_shape(V: int, T: int, window: tuple[int, int],
                                               overlap: tuple[int, int], plan: str) -> None:
    """A window overlapping more than its L-shape (flush's last, or overlap > 1): its extra known cells are masked
    out, never rewritten."""
    torch.manual_seed(0)
    grid = torch.randn(1, V, T, 3, 2, 2)
    known = torch.zeros(1, V, T)
    known[:, 0, :] = 1
    known[:, :, 0] = 1
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def generate(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls.append((x.clone(), mask.clone()))
        return torch.full_like(x, float(len(calls)))  # each window writes its own number

    out, count = fill_grid(grid, known, window, generate, overlap, plan)
    assert len(calls) > 1
    for x, mask in calls:
        assert torch.equal(mask, _l_shape(mask))
        assert (x[mask == 0] == 0).all()  # unknown-for-conditioning cells carry no stale values
    given = known[0].bool()
    assert torch.equal(out[0][given], grid[0][given]) and count[given].sum() == 0 and (count[~given] == 1).all()
    # a cell keeps the number of the first window that covered it: later windows never rewrite it
    wv, wt = min(window[0], V), min(window[1], T)
    first = torch.zeros(V, T)
    for i, (v0, t0, nv, nt) in enumerate(plan_windows(V, T, wv, wt, *overlap, plan=plan)):
        region = first[v0:v0 + nv, t0:t0 + nt]
        region[region == 0] = i + 1
    assert torch.equal(out[0, :, :, 0, 0, 0][~given], first[~given])


def test_missing_first_column_is_refused() -> None:
    grid = torch.zeros(1, 4, 4, 3, 2, 2)
    known = torch.zeros(1, 4, 4)
    known[:, 0, :] = 1
    with pytest.raises(ValueError, match="first row/column"):
        fill_grid(grid, known, (2, 2), lambda x, m: x)
