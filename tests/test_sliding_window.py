"""Sliding windows fill every cell exactly once, keep given cells bit-exact, condition like training."""

from __future__ import annotations

import pytest
import torch

from model.sliding_window import fill_grid, plan_windows, window_starts


@pytest.mark.parametrize("total,size,overlap", [(32, 8, 1), (16, 8, 2), (8, 8, 1), (5, 8, 1), (17, 8, 3)])
def test_window_starts_cover_everything(total: int, size: int, overlap: int) -> None:
    starts = window_starts(total, size, overlap)
    covered = set()
    for a, b in zip(starts, starts[1:]):
        assert b - a <= size - overlap  # overlap at least as asked
    for s in starts:
        covered |= set(range(s, min(total, s + size)))
    assert covered == set(range(total)) and starts[0] == 0


@pytest.mark.parametrize("V,T,window,overlap", [(16, 32, (8, 8), (1, 1)), (10, 12, (4, 5), (2, 1)), (4, 4, (8, 8), (1, 1))])
def test_fill_grid_generates_each_cell_once(V: int, T: int, window: tuple[int, int], overlap: tuple[int, int]) -> None:
    torch.manual_seed(0)
    grid = torch.randn(1, V, T, 3, 2, 2)
    known = torch.zeros(1, V, T)
    known[:, 0, :] = 1
    known[:, :, 0] = 1
    seen_masks = []

    def generate(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen_masks.append(mask.clone())
        return torch.full_like(x, 7.0)

    out, count = fill_grid(grid, known, window, generate, overlap)
    given = known[0].bool()
    assert torch.equal(out[0][given], grid[0][given])  # bit-exact
    assert (out[0][~given] == 7.0).all()
    assert count[given].sum() == 0 and (count[~given] == 1).all()
    for m in seen_masks:  # every window conditions on a full first row and column, as in training
        assert m[:, 0, :].all() and m[:, :, 0].all()
    assert len(seen_masks) <= len(plan_windows(V, T, *[min(w, n) for w, n in zip(window, (V, T))], *overlap))


def test_missing_first_column_is_refused() -> None:
    grid = torch.zeros(1, 4, 4, 3, 2, 2)
    known = torch.zeros(1, 4, 4)
    known[:, 0, :] = 1
    with pytest.raises(ValueError, match="first row/column"):
        fill_grid(grid, known, (2, 2), lambda x, m: x)
