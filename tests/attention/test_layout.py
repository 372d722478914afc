import logging
import math

import pytest
import torch

from multisubject.attention.layout import (
    MASK_AREA_THRESHOLD,
    Layout,
    Region,
    TokenGrid,
    composite_ownership,
    describe_unowned,
    mask_token_coverage,
    overlap_order,
    parse_boxes,
    region_areas,
    region_token_masks,
)

# token grids


@pytest.mark.parametrize(
    "latent, downscale, grid",
    [((128, 128), 1, (128, 128)), ((128, 128), 4, (32, 32)), ((75, 125), 2, (38, 63)), ((7, 5), 4, (2, 2))],
)
def test_grid_rounds_up_like_stride_two_convolutions(latent, downscale, grid):
    g = TokenGrid.from_latent(*latent, downscale)
    assert (g.h, g.w) == grid


def test_grid_inferred_from_token_count_on_non_square_latent():
    # SDXL 1216x832 -> latent 152x104: grids 152x104, 76x52, 38x26
    for downscale, tokens in ((1, 152 * 104), (2, 76 * 52), (4, 38 * 26)):
        g = TokenGrid.infer(152, 104, tokens)
        assert g.num_tokens == tokens and g.cell_h == pytest.approx(downscale / 152)
    # Flux patches: odd latent 75x51 -> 38x26 tokens
    assert (TokenGrid.infer(75, 51, 38 * 26, base=2).h, TokenGrid.infer(75, 51, 38 * 26, base=2).w) == (38, 26)


def test_grid_inference_rejects_foreign_sequence_length():
    with pytest.raises(ValueError, match="no token grid of a 64x64 latent has 77 tokens"):
        TokenGrid.infer(64, 64, 77)


# boxes -> tokens


def test_box_edges_round_outward():
    layout = Layout.from_boxes(1024, 1024, [(0.1, 0.2, 0.3, 0.55)])
    tokens = region_token_masks(layout, TokenGrid.from_latent(128, 128, 4))[0]  # 32x32 grid
    rows = torch.nonzero(tokens.any(1)).flatten()
    cols = torch.nonzero(tokens.any(0)).flatten()
    assert (int(rows[0]), int(rows[-1]) + 1) == (math.floor(0.2 * 32), math.ceil(0.55 * 32))
    assert (int(cols[0]), int(cols[-1]) + 1) == (math.floor(0.1 * 32), math.ceil(0.3 * 32))
    assert int(tokens.sum()) == (18 - 6) * (10 - 3)


def test_tiny_box_keeps_one_token_and_warns(caplog):
    layout = Layout.from_boxes(1024, 1024, [(0.501, 0.501, 0.502, 0.502)])
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        tokens = region_token_masks(layout, TokenGrid.from_latent(128, 128, 4))
    assert int(tokens.sum()) == 1
    assert "smaller than one token" in caplog.text


def test_box_on_exact_token_edges_is_not_grown():
    layout = Layout.from_boxes(512, 512, [(0.25, 0.5, 0.75, 1.0)])
    tokens = region_token_masks(layout, TokenGrid.from_latent(64, 64, 2))[0]  # 32x32
    assert int(tokens.sum()) == 16 * 16


def test_box_on_odd_latent_uses_the_model_stride():
    # latent 7 rows, downscale 2 -> 4 token rows covering latent rows [0,2),[2,4),[4,6),[6,7)
    layout = Layout.from_boxes(8, 56, [(0.0, 6 / 7, 1.0, 1.0)])
    tokens = region_token_masks(layout, TokenGrid.from_latent(7, 1, 2))[0]
    assert tokens.flatten().tolist() == [False, False, False, True]


# masks -> tokens


def test_mask_area_downsampling_is_exact_on_partial_cells():
    mask = torch.zeros(10, 10)
    mask[:, :3] = 1.0  # 30% of the width
    coverage = mask_token_coverage(mask, TokenGrid(h=1, w=2, cell_h=1.0, cell_w=0.5))
    assert coverage[0].tolist() == pytest.approx([0.6, 0.0])
    # canvas 10 px, grid cells of 4 px: the last cell holds 2 px inside the canvas
    coverage = mask_token_coverage(mask, TokenGrid(h=1, w=3, cell_h=1.0, cell_w=0.4))
    assert coverage[0].tolist() == pytest.approx([0.75, 0.0, 0.0])


def test_mask_threshold_decides_membership():
    mask = torch.zeros(8, 8)
    mask[:, :3] = 1.0  # tokens of 4x4 px: left column 75% covered
    mask[:2, 4:6] = 1.0  # top-right token 25% covered
    tokens = region_token_masks(Layout.from_masks(mask[None]), TokenGrid(h=2, w=2, cell_h=0.5, cell_w=0.5))[0]
    assert MASK_AREA_THRESHOLD == 0.5
    assert tokens.tolist() == [[True, False], [True, False]]


def test_tiny_mask_keeps_its_best_token(caplog):
    mask = torch.zeros(64, 64)
    mask[40, 50] = 1.0
    with caplog.at_level(logging.WARNING, logger="multisubject"):
        tokens = region_token_masks(Layout.from_masks(mask[None]), TokenGrid.from_latent(8, 8, 1))[0]
    assert tokens.sum() == 1 and bool(tokens[40 // 8, 50 // 8])
    assert "kept its best-covered token" in caplog.text


# priority compositing


def test_highest_priority_owns_the_overlap():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :, :3] = True
    masks[1, :, 1:] = True
    masks[2, 0, 0] = True
    own = composite_ownership(masks, [5, 1, 0], [1.0, 1.0, 1.0])
    assert own.owner[1].tolist() == [0, 0, 0, 1]
    assert own.owner[0, 0] == 0  # subject 2 is lower than subject 0
    assert own.exclusive.sum(0).max() == 1
    assert not own.background.any()


def _composite(layout, priorities, active=None):
    masks = region_token_masks(layout, TokenGrid.from_latent(8, 8))
    return masks, composite_ownership(masks, priorities, region_areas(layout), active)


NESTED = [(0.25, 0.25, 0.5, 0.5), (0.0, 0.0, 1.0, 1.0)]  # a hat listed before the dog it sits on


def test_by_default_the_smaller_nested_region_owns_the_overlap_whatever_the_order():
    for boxes in (NESTED, NESTED[::-1]):
        masks, own = _composite(Layout.from_boxes(64, 64, boxes), [0, 0])
        small = 0 if boxes is NESTED else 1
        assert torch.equal(own.exclusive[small], masks[small]) and int(masks[small].sum()) == 4
        assert int(own.exclusive[1 - small].sum()) == 64 - 4 and own.unowned() == []


def test_explicit_priority_beats_area():
    masks, own = _composite(Layout.from_boxes(64, 64, NESTED), [0, 1])
    assert own.unowned() == [0] and int(own.exclusive[1].sum()) == 64
    messages = describe_unowned(own, masks, ["hat", "dog"], "of the 8x8 token grid")
    assert list(messages) == [0] and "'hat' owns no token of the 8x8 token grid: 'dog' cover" in messages[0]


def test_equal_priority_and_equal_area_go_to_the_later_subject():
    # widths 0.4 - 0.1 and 0.6 - 0.3 differ in the last float bit: still a tie
    boxes = [(0.1, 0.0, 0.4, 1.0), (0.3, 0.0, 0.6, 1.0)]
    areas = region_areas(Layout.from_boxes(64, 64, boxes))
    assert areas[0] != areas[1] and overlap_order([0, 0], areas) == [0, 1]
    for order in (boxes, boxes[::-1]):
        _, own = _composite(Layout.from_boxes(64, 64, order), [0, 0])
        assert own.owner[0, 3].item() == 1  # column 3 (0.375..0.5) lies in both boxes
    assert overlap_order([0, 0, 0], [0.5, 0.5, 0.5]) == [0, 1, 2]
    assert overlap_order([2, 0, 1], [0.1, 0.9, 0.5]) == [1, 2, 0]


def test_region_area_of_masks_is_their_mean_value():
    mask = torch.zeros(10, 20)
    mask[:5, :10] = 1.0
    mask[5:, :] = 0.5
    areas = region_areas(Layout.from_masks(mask[None]).extend(Layout.from_boxes(20, 10, [(0.0, 0.0, 0.5, 0.2)])))
    assert areas == pytest.approx([0.25 + 0.25, 0.1])


def test_inactive_subjects_take_no_part_exactly_as_if_left_out():
    boxes = [(0.0, 0.0, 0.75, 0.75), (0.25, 0.25, 1.0, 1.0), (0.5, 0.0, 0.75, 0.5)]
    layout = Layout.from_boxes(64, 64, boxes)
    for active in ((0, 1), (0, 2), (1,), ()):
        _, own = _composite(layout, [0, 1, 2], active)
        _, alone = _composite(Layout.from_boxes(64, 64, [boxes[j] for j in active]), [[0, 1, 2][j] for j in active])
        remap = torch.tensor([-1, *active])  # alone's owner index -> index among all subjects
        assert torch.equal(own.owner, remap[alone.owner + 1])
        inactive = [j for j in range(3) if j not in active]
        assert not own.exclusive[inactive].any() and own.active == active


def test_background_is_what_no_subject_covers():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 2, 2] = True
    own = composite_ownership(masks, [0, 0], [0.1, 0.1])
    assert int(own.background.sum()) == 7 and own.owner[1, 1] == -1
    with pytest.raises(ValueError, match="got 1 priorities and 2 areas for 2 subject masks"):
        composite_ownership(masks, [0], [0.1, 0.1])


# layouts


def test_rasterize_boxes_pixel_exact():
    masks = Layout.from_boxes(10, 4, [(0.25, 0.0, 0.5, 0.5)]).rasterize()
    assert masks.shape == (1, 4, 10)
    assert masks[0, 0].tolist() == pytest.approx([0, 0, 0.5, 1, 1, 0.0, 0, 0, 0, 0])
    assert masks[0, 2:].sum() == 0


def test_mask_region_must_match_canvas():
    with pytest.raises(ValueError, match=r"region 0 mask is 8x8 but the layout canvas is 16x8; .*never resized"):
        Layout(16, 8, (Region(mask=torch.ones(8, 8)),))


def test_all_zero_mask_is_rejected():
    with pytest.raises(ValueError, match=r"mask 1 of 2 is all zero"):
        Layout.from_masks(torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]))


def test_chaining_layouts_needs_one_canvas():
    a = Layout.from_masks(torch.ones(1, 8, 8))
    assert len(a.extend(Layout.from_masks(torch.ones(2, 8, 8)))) == 3
    with pytest.raises(ValueError, match="different canvas sizes: 8x8 and 16x8"):
        a.extend(Layout.from_masks(torch.ones(1, 8, 16)))


def test_aspect_ratio_check_names_both_sizes():
    layout = Layout.from_boxes(1024, 768, [(0, 0, 1, 1)])
    layout.check_aspect(96, 128)
    layout.check_aspect(97, 128)  # one latent unit of rounding
    with pytest.raises(ValueError, match=r"canvas 1024x768 .* latent 128x128"):
        layout.check_aspect(128, 128)


def test_subject_count_mismatch_message():
    with pytest.raises(ValueError, match=r"layout has 2 region\(s\) but 3 subject\(s\) are connected"):
        Layout.from_boxes(64, 64, [(0, 0, 1, 1), (0, 0, 0.5, 0.5)]).check_subject_count(3)


# parsing boxes


def test_parse_lines_with_labels_comments_and_pixels():
    text = "# two pets\ncorgi: 0.05, 0.2, 0.5, 0.95\n\n0.5 0.1 0.95 0.9\n"
    assert parse_boxes(text) == [((0.05, 0.2, 0.5, 0.95), "corgi"), ((0.5, 0.1, 0.95, 0.9), "")]
    assert parse_boxes("0, 0, 512, 256", units="pixels", width=1024, height=512) == [((0.0, 0.0, 0.5, 0.5), "")]


def test_parse_json_forms():
    assert parse_boxes("[[0, 0, 0.5, 0.5]]") == [((0.0, 0.0, 0.5, 0.5), "")]
    assert parse_boxes('[{"box": [0.1, 0.1, 0.2, 0.2], "label": "hat"}]') == [((0.1, 0.1, 0.2, 0.2), "hat")]


def test_parse_other_packs_json():
    # core CreateBoundingBoxes / BOUNDING_BOX: pixels of the canvas whatever the units widget says, label from metadata
    core = '[{"x": 64, "y": 128, "width": 256, "height": 128, "metadata": {"text": "corgi"}}, {"x": 0, "y": 0, "width": 512, "height": 256}]'
    expected = [((0.125, 0.5, 0.625, 1.0), "corgi"), ((0.0, 0.0, 1.0, 1.0), "")]
    assert parse_boxes(core, width=512, height=256) == expected
    assert parse_boxes(core, units="pixels", width=512, height=256) == expected
    assert parse_boxes(f"[{core}]", width=512, height=256) == expected  # a one-frame BOUNDING_BOX frame list
    # Ideogram-style elements: [ymin, xmin, ymax, xmax] on a 0..1000 grid, label from desc
    ideogram = '[{"type": "obj", "bbox": [100, 250, 900, 500], "desc": "teapot"}]'
    assert parse_boxes(ideogram) == [((0.25, 0.1, 0.5, 0.9), "teapot")]


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("", {}, "no boxes given: the text is empty"),
        ("  \n# only a comment\n", {}, "every line is blank or a comment"),
        ("0.1, 0.2, 1.3, 0.9", {}, r"outside \[0, 1\]"),
        ("-0.1, 0.2, 0.3, 0.9", {}, r"outside \[0, 1\]"),
        ("0, 0, 1100, 200", {"units": "pixels", "width": 1024, "height": 512}, "outside the 1024x512 canvas"),
        ("0.5, 0.2, 0.3, 0.9", {}, "inverted corners; need x1 > x0 and y1 > y0"),
        ("0.1, 0.9, 0.3, 0.2", {}, "inverted corners"),
        ("0.3, 0.2, 0.3, 0.9", {}, "zero area"),
        ("0.1, nan, 0.3, 0.9", {}, "NaN or inf"),
        ("0.1, 0.2, inf, 0.9", {}, "NaN or inf"),
        ("0.1, 0.2, 0.3", {}, r"line 1 .*expected 4 numbers x0, y0, x1, y1, got 3"),
        ("0.1, 0.2, 0.3, 0.4\n0.1, 0.2, 0.3, 0.4, 0.5", {}, r"line 2 .*got 5"),
        ("0.1, 0.2, abc, 0.4", {}, "'abc' is not a number"),
        ("[[0.1, 0.2, 0.3, 0.4]", {}, "boxes look like JSON but do not parse"),
        ('[{"rect": [0, 0, 1, 1]}]', {}, r"needs 'box', 'x'/'y'/'width'/'height' or 'bbox' keys.*reads: one box per line"),
        ('["corgi", "teapot"]', {}, r"JSON box 0: expected a list of 4 numbers.*core Create Bounding Boxes.*Ideogram"),
        ('[{"x": 0, "y": 0, "width": 900, "height": 10}]', {"width": 512, "height": 512}, "outside the 512x512 canvas"),
        ('[{"bbox": [0, 0, 1200, 500]}]', {}, r"outside \[0, 1\]"),
        ("[[0.1, 0.2]]", {}, "JSON box 0: expected 4 numbers"),
    ],
)
def test_bad_boxes_get_clear_errors(text, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parse_boxes(text, **kwargs)
