import pytest
import torch

from multisubject.attention.subjects import Subject, Subjects


def test_rgba_alpha_becomes_the_subject_mask():
    image = torch.rand(1, 8, 6, 4)
    s = Subject.from_image(image, label="cat")
    assert s.images.shape == (1, 8, 6, 3)
    assert torch.equal(s.masks, image[..., 3])


def test_grayscale_is_converted_to_rgb():
    s = Subject.from_image(torch.rand(2, 5, 5, 1))
    assert s.images.shape == (2, 5, 5, 3) and torch.equal(s.images[..., 0], s.images[..., 2])


def test_several_reference_images_are_kept_in_order():
    images = torch.rand(3, 16, 16, 3)
    s = Subject.from_image(images, torch.ones(1, 16, 16))
    assert s.num_images == 3 and torch.equal(s.images, images)
    assert s.masks.shape == (3, 16, 16)  # one mask broadcast to every reference image


def test_invert_mask_for_loadimage_cutouts():
    mask = torch.zeros(4, 4)
    mask[0] = 1.0
    s = Subject.from_image(torch.rand(1, 4, 4, 3), mask, invert_mask=True)
    assert s.masks[0, 0].sum() == 0 and s.masks[0, 1:].min() == 1


def test_mask_must_match_image_size():
    with pytest.raises(ValueError, match=r"expected \(R, 8, 8\), got \(1, 4, 4\)"):
        Subject.from_image(torch.rand(1, 8, 8, 3), torch.ones(1, 4, 4))


def test_mask_count_must_match_images():
    with pytest.raises(ValueError, match="3 reference images but 2 masks"):
        Subject.from_image(torch.rand(3, 8, 8, 3), torch.ones(2, 8, 8))


def test_start_after_end_is_rejected():
    with pytest.raises(ValueError, match=r"start_percent \(0.8\) is after end_percent \(0.2\)"):
        Subject.from_image(torch.rand(1, 4, 4, 3), start_percent=0.8, end_percent=0.2, label="dog")


@pytest.mark.parametrize("weight", [-0.5, 5.5, float("nan")])
def test_weight_out_of_range_is_rejected(weight):
    with pytest.raises(ValueError, match=r"weight must be within \[0.0, 5.0\]"):
        Subject.from_image(torch.rand(1, 4, 4, 3), weight=weight)


def test_bad_channel_count_is_rejected():
    with pytest.raises(ValueError, match="1, 3 or 4 channels, got shape"):
        Subject.from_image(torch.rand(1, 4, 4, 2))


def test_subjects_chain_is_immutable_and_ordered():
    a = Subject.from_image(torch.rand(1, 4, 4, 3), label="a", priority=2)
    b = Subject.from_image(torch.rand(1, 4, 4, 3), label="b")
    one = Subjects().append(a)
    two = one.append(b)
    assert len(one) == 1 and two.labels == ["a", "b"] and two.priorities == [2, 0]
    assert "#1 b: 1 image(s)" in two.describe()


def test_all_zero_subject_mask_suggests_invert():
    with pytest.raises(ValueError, match=r"reference image\(s\) \[1\] is all zero.*turn on invert_mask"):
        Subject.from_image(torch.rand(2, 4, 4, 3), torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]))
