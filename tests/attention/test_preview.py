import pytest
import torch

from multisubject.attention.layout import Layout
from multisubject.attention.preview import (
    EMPTY_BACKGROUND,
    FILL_ALPHA,
    WARNING_COLOUR,
    ownership_warnings,
    region_colour,
    render_layout,
)
from multisubject.attention.subjects import Subject, Subjects


def _tint(bg, index):
    return [b * (1 - FILL_ALPHA) + c * FILL_ALPHA for b, c in zip(bg, region_colour(index))]


def test_regions_are_tinted_with_their_colour():
    layout = Layout.from_boxes(200, 100, [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)])
    image = render_layout(layout)
    assert image.shape == (1, 100, 200, 3)
    for index, x in ((0, 50), (1, 150)):
        assert image[0, 70, x].tolist() == pytest.approx(_tint([EMPTY_BACKGROUND] * 3, index), abs=1 / 255)


def test_overlap_shows_the_priority_winner_on_top():
    layout = Layout.from_boxes(100, 100, [(0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)])
    subjects = Subjects(tuple(Subject.from_image(torch.ones(1, 4, 4, 3), priority=p) for p in (3, 0)))
    pixel = render_layout(layout, subjects)[0, 60, 80]  # above the warning that subject 2 owns nothing
    expected = _tint(_tint([EMPTY_BACKGROUND] * 3, 1), 0)  # subject 1 painted first, subject 0 on top
    assert pixel.tolist() == pytest.approx(expected, abs=1 / 255)


def test_by_default_the_smaller_nested_region_is_drawn_on_top():
    layout = Layout.from_boxes(100, 100, [(0.2, 0.2, 0.6, 0.6), (0.0, 0.0, 1.0, 1.0)])  # nested box listed first
    pixel = render_layout(layout)[0, 40, 40]
    assert pixel.tolist() == pytest.approx(_tint(_tint([EMPTY_BACKGROUND] * 3, 1), 0), abs=1 / 255)
    assert ownership_warnings(layout) == []


def _warning_pixels(image):
    return (((image[0] * 255).round() - torch.tensor(WARNING_COLOUR, dtype=torch.float)).abs().amax(-1) < 1).sum()


def test_a_subject_left_without_tokens_is_warned_on_the_image_and_in_the_log(caplog):
    layout = Layout.from_boxes(256, 256, [(0.2, 0.2, 0.6, 0.6), (0.0, 0.0, 1.0, 1.0)])
    hat_wins, dog_wins = (
        Subjects(tuple(Subject.from_image(torch.ones(1, 4, 4, 3), label=n, priority=p) for n, p in zip(("hat", "dog"), ps)))
        for ps in ((0, 0), (0, 1))
    )
    assert _warning_pixels(render_layout(layout, hat_wins)) == 0
    with caplog.at_level("WARNING", logger="multisubject"):
        image = render_layout(layout, dog_wins)
    assert _warning_pixels(image) > 20
    assert "'hat' owns no token at 8 px tokens (32x32 grid): 'dog' cover(s) all of its region" in caplog.text
    assert ownership_warnings(layout, dog_wins) == [caplog.records[-1].getMessage().removeprefix("multisubject: layout: ")]


def test_warnings_consider_only_subjects_active_together():
    layout = Layout.from_boxes(256, 256, [(0.2, 0.2, 0.6, 0.6), (0.0, 0.0, 1.0, 1.0)])

    def subjects(dog_fields):
        return Subjects((
            Subject.from_image(torch.ones(1, 4, 4, 3), label="hat", start_percent=0.0, end_percent=0.4),
            Subject.from_image(torch.ones(1, 4, 4, 3), label="dog", priority=1, **dog_fields),
        ))

    assert ownership_warnings(layout, subjects({"weight": 0.0})) == []
    assert ownership_warnings(layout, subjects({"start_percent": 0.5})) == []
    assert len(ownership_warnings(layout, subjects({"start_percent": 0.4}))) == 1  # both active at 0.4


def test_thumbnails_of_subjects_are_pasted():
    layout = Layout.from_boxes(256, 256, [(0.0, 0.0, 1.0, 1.0)])
    red = torch.zeros(1, 32, 32, 3)
    red[..., 0] = 1.0
    image = render_layout(layout, Subjects((Subject.from_image(red, label="fox"),)))
    assert ((image[0, ..., 0] > 0.99) & (image[0, ..., 1] < 0.01)).sum() > 400


def test_background_must_share_the_aspect_ratio():
    layout = Layout.from_boxes(200, 100, [(0, 0, 1, 1)])
    assert render_layout(layout, background=torch.zeros(50, 100, 3)).shape == (1, 50, 100, 3)
    with pytest.raises(ValueError, match="background image is 100x100 but the layout canvas is 200x100"):
        render_layout(layout, background=torch.zeros(100, 100, 3))
