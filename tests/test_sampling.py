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


def test_loop_is_the_progressive_loop_kept_and_previews_decode_the_latents(tiny):
    from spdinv.inversion import invert, source_branch
    from spdinv.sampling import loop, loop_progressive

    image = torch.rand(1, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inversion = invert(tiny, image, "a red circle", "ddim", 5, diagnose=False, progress=False)
    branches = [source_branch(tiny, inversion), Branch(tiny.encode_prompt("a blue circle"), 7.5, tiny.encode_prompt(""))]
    steps = list(loop_progressive(tiny, inversion.schedule, inversion.z_T, branches, preview_every=2))
    kept = loop(tiny, inversion.schedule, inversion.z_T, branches)
    assert [s.i for s in steps] == [0, 1, 2, 3, 4] and kept.shape[0] == 6
    assert torch.equal(torch.stack([s.latents for s in steps]), kept[1:])  # the same computations, same shapes
    assert [s.preview is not None for s in steps] == [False, True, False, True, True]  # every 2nd and the last
    assert torch.equal(steps[-1].preview, tiny.decode(kept[-1]))
    assert all(s.preview is None for s in loop_progressive(tiny, inversion.schedule, inversion.z_T, branches))
