"""The sampler's UNet batch rows (`BatchRows`) and its progressive loop."""

import torch

from spdinv.sampling import BatchRows, Branch, Row, batch_rows

SOURCE, TARGET = 0, 1


def branch(scale: float, pinned: bool = False) -> Branch:
    return Branch(torch.zeros(1, 4, 8), scale, torch.zeros(1, 4, 8), torch.zeros(3, 1, 4, 8, 8) if pinned else None)


def test_batch_rows_name_each_rows_branch_and_kind():
    rows = batch_rows([branch(1.0), branch(7.5)])  # an unguided source needs no unconditional row
    assert rows.rows == (Row(TARGET, False), Row(SOURCE, True), Row(TARGET, True))
    assert (rows.uncond(SOURCE), rows.uncond(TARGET), rows.cond(SOURCE), rows.cond(TARGET)) == (None, 0, 1, 2)
    assert rows.uncond_branches == [TARGET] and rows.pair(SOURCE, TARGET) == slice(1, 3)
    full = batch_rows([branch(1.0), branch(7.5)], every_uncond=True)
    assert [(r.branch, r.conditional) for r in full] == [(0, False), (1, False), (0, True), (1, True)]
    assert batch_rows([branch(7.5, pinned=True), branch(7.5)]).uncond_branches == [TARGET]  # a pin discards guidance
    assert len(batch_rows([branch(1.0), branch(1.0)])) == 2 and batch_rows([branch(1.0), branch(1.0)], True).uncond_branches == []


def test_rows_taken_from_another_branch():
    full = BatchRows.of([SOURCE, TARGET], 2)  # [source uncond, target uncond, source cond, target cond]
    assert full.same_kind_from(SOURCE, TARGET) == [0, 0, 2, 2]  # MasaCtrl: each kind from its own kind
    assert full.all_from(full.cond(SOURCE), TARGET) == [0, 2, 2, 2]  # PnP: every target row from the source's cond
    lean = BatchRows.of([TARGET], 2)  # [target uncond, source cond, target cond]
    assert lean.same_kind_from(SOURCE, TARGET) == [1, 1, 1]  # no source uncond row: its cond row stands in
    assert BatchRows.of([], 3).pair(0, 2) == [0, 2]

