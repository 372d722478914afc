"""Layout nodes: boxes or masks -> LAYOUT, a preview of it, and LAYOUT -> MASK for other packs."""

from __future__ import annotations

import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..attention.checks import check_image_batch
from ..attention.hook_keys import EDITOR_UI
from ..attention.layout import Layout, check_mask_batch_size, composite_ownership, parse_boxes, region_areas
from ..attention.preview import render_layout
from .inputs import check_inputs
from .types import CATEGORY, LAYOUT, PREFIX, SUBJECTS, mask_batch

THUMBNAIL_SIDE = 128  # longest side of the reference thumbnails sent to the editor
_SUBJECTS_TOOLTIP = "Optional subjects: their count is checked against the regions and their labels fill unlabelled regions."


def _label_from_subjects(layout: Layout, subjects) -> Layout:
    if subjects is None:
        return layout
    layout.check_subject_count(len(subjects))
    return layout.with_labels(subjects.labels)


class LayoutFromBoxes(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LayoutFromBoxes",
            display_name="Layout from Boxes",
            category=f"{CATEGORY}/layout",
            description="One box per subject, in subject order: drawn on the canvas editor or typed as text. "
            "Also reads box lists other packs emit as JSON (core Create Bounding Boxes, Ideogram-style elements).",
            inputs=[
                io.String.Input(
                    "boxes", multiline=True, default="0.05, 0.15, 0.50, 0.95\n0.50, 0.15, 0.95, 0.95",
                    tooltip="One box per line: 'x0, y0, x1, y1' or 'label: x0, y0, x1, y1' (top-left, then "
                    "bottom-right), or a JSON list [[x0, y0, x1, y1], ...] / [{\"box\": [...], \"label\": \"...\"}]. "
                    "Lines starting with # are ignored. Also JSON from other packs: [{\"x\", \"y\", \"width\", "
                    "\"height\"}] in pixels (core Create Bounding Boxes) or [{\"bbox\": [ymin, xmin, ymax, xmax]}] on "
                    "a 0..1000 grid. The canvas editor above rewrites this text as you draw.",
                ),
                io.Combo.Input(
                    "units", options=["normalized", "pixels"], default="normalized",
                    tooltip="normalized: fractions 0..1 of the canvas. pixels: pixel coordinates on the canvas.",
                ),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8,
                             tooltip="Canvas width in pixels: the width of the image you generate."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8,
                             tooltip="Canvas height in pixels: the height of the image you generate."),
                SUBJECTS.Input("subjects", optional=True, tooltip=_SUBJECTS_TOOLTIP),
                io.Image.Input("background", optional=True,
                               tooltip="Optional picture shown behind the boxes in the canvas editor after a run "
                               "(a sketch, the previous result). Display only: it does not change the layout."),
            ],
            outputs=[LAYOUT.Output(display_name="layout")],
        )

    @classmethod
    def execute(cls, boxes, units, width, height, subjects=None, background=None) -> io.NodeOutput:
        check_inputs(cls, units=units, width=width, height=height)
        if background is not None:
            check_image_batch("background", background)
        parsed = parse_boxes(boxes, units=units, width=width, height=height)
        layout = Layout.from_boxes(width, height, [b for b, _ in parsed], [lab for _, lab in parsed])
        layout = _label_from_subjects(layout, subjects)
        return io.NodeOutput(layout, ui={EDITOR_UI: [_editor_pictures(subjects, background)]})


def _editor_pictures(subjects, background) -> dict:
    """Temp PNGs for the canvas editor: the first background image and each subject's first reference, shrunk."""

    def save(image):  # (H, W, C) float in [0, 1]
        saved = ui.ImageSaveHelper.save_images(
            image[None, ..., :3], filename_prefix="multisubject_canvas", folder_type=io.FolderType.temp, cls=None
        )
        return saved[0]

    def thumbnail(image):  # (H, W, 3) -> longest side THUMBNAIL_SIDE at most, aspect kept
        scale = THUMBNAIL_SIDE / max(image.shape[:2])
        if scale >= 1:
            return image
        size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        return F.interpolate(image.movedim(-1, 0)[None], size=size, mode="bilinear", antialias=True)[0].movedim(0, -1)

    return {
        "background": None if background is None else save(background[0]),
        "thumbnails": [] if subjects is None else [save(thumbnail(s.images[0].float())) for s in subjects],
    }


class LayoutFromMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LayoutFromMasks",
            display_name="Layout from Masks",
            category=f"{CATEGORY}/layout",
            description="One mask per subject, in subject order: a mask batch, or chain several of these nodes.",
            inputs=[
                io.Mask.Input(
                    "masks",
                    tooltip="Mask(s) at the size of the image you generate, 1 = where the subject goes. A batch of S "
                    "masks gives S regions. Masks are never resized.",
                ),
                LAYOUT.Input("layout", optional=True,
                             tooltip="A layout to extend: these masks' regions are appended after its regions."),
                SUBJECTS.Input("subjects", optional=True, tooltip=_SUBJECTS_TOOLTIP),
            ],
            outputs=[LAYOUT.Output(display_name="layout")],
        )

    @classmethod
    def execute(cls, masks, layout=None, subjects=None) -> io.NodeOutput:
        result = Layout.from_masks(mask_batch(masks))
        if layout is not None:
            result = layout.extend(result)
        return io.NodeOutput(_label_from_subjects(result, subjects))


class PreviewLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}PreviewLayout",
            display_name="Preview Layout",
            category=f"{CATEGORY}/layout",
            description="Draws the layout: coloured regions (top = owner of an overlap), labels and subject thumbnails; "
            "a red warning names any subject that would own no token where regions overlap.",
            inputs=[
                LAYOUT.Input("layout", tooltip="The layout to draw."),
                SUBJECTS.Input("subjects", optional=True,
                               tooltip="Optional subjects for labels, priorities and reference thumbnails."),
                io.Image.Input("background", optional=True,
                               tooltip="Optional image to draw on (first of the batch), same aspect ratio as the canvas."),
            ],
            outputs=[io.Image.Output(display_name="image")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, layout, subjects=None, background=None) -> io.NodeOutput:
        if background is not None:
            check_image_batch("background", background)
        image = render_layout(layout, subjects, None if background is None else background[0])
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


class LayoutToMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LayoutToMasks",
            display_name="Layout to Masks",
            category=f"{CATEGORY}/layout",
            description="One canvas-sized mask per region, for other packs (IPAdapter attention masks, regional prompts).",
            inputs=[
                LAYOUT.Input("layout", tooltip="The layout to turn into masks, one per region in subject order."),
                io.Boolean.Input(
                    "exclusive", default=False,
                    tooltip="Give each pixel to one region only, resolving overlaps as the attention does: higher priority, "
                    "then the smaller region, wins.",
                ),
                SUBJECTS.Input("subjects", optional=True,
                               tooltip="Optional subjects whose priorities decide overlaps when exclusive is on."),
            ],
            outputs=[io.Mask.Output(display_name="masks")],
        )

    @classmethod
    def execute(cls, layout, exclusive, subjects=None) -> io.NodeOutput:
        if subjects is not None:
            layout.check_subject_count(len(subjects))
        check_mask_batch_size(layout)
        masks = layout.rasterize()
        if exclusive:
            priorities = subjects.priorities if subjects is not None else [0] * len(layout)
            masks = masks * composite_ownership(masks > 0.5, priorities, region_areas(layout)).exclusive.float()
        return io.NodeOutput(masks)
