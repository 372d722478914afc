"""Subject nodes: turn images into SUBJECTS records."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.subjects import WEIGHT_RANGE, Subject, Subjects
from .types import CATEGORY, PREFIX, SUBJECTS


class SubjectNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}Subject",
            display_name="Subject",
            category=f"{CATEGORY}/subjects",
            description=(
                "One subject (person, pet, object) from its reference image(s). Chain Subject nodes to build the "
                "ordered subject list; the order is the order of the layout's boxes or masks."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip="Reference image(s) of this subject. A batch = several views of the same subject (all "
                    "kept). RGBA images use their alpha as the subject mask; grayscale is converted to RGB.",
                ),
                io.String.Input(
                    "label", default="", tooltip="What the subject is, as in your prompt (e.g. 'a corgi'). "
                    "Shown in previews and used by identity scoring."
                ),
                io.Float.Input(
                    "weight", default=1.0, min=WEIGHT_RANGE[0], max=WEIGHT_RANGE[1], step=0.05,
                    tooltip="Strength of this subject. 0 turns it off; 1 is the method's normal strength.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Where in the denoising schedule the subject starts to apply (0 = from the first step).",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Where it stops applying (1 = until the last step). Must not be before start_percent.",
                ),
                io.Int.Input(
                    "priority", default=0, min=-100, max=100,
                    tooltip="Who wins where regions overlap: higher priority owns the overlap. On equal priority "
                    "(the default 0 for all) the smaller region wins, so a box nested in another's (a hat on a dog) "
                    "keeps its tokens; on equal priority and area the later subject wins. Raise it to let a larger "
                    "region win over a smaller one.",
                ),
                io.Boolean.Input(
                    "invert_mask", default=False,
                    tooltip="Invert the mask. Turn on for LoadImage's MASK of a cut-out PNG, which marks the "
                    "transparent background rather than the subject.",
                ),
                io.Mask.Input(
                    "mask", optional=True,
                    tooltip="Optional subject mask on the reference image (1 = subject), same size as the image; one "
                    "mask for all reference images or one per image.",
                ),
                SUBJECTS.Input(
                    "subjects", optional=True,
                    tooltip="Subjects from a previous Subject node; this subject is appended after them.",
                ),
            ],
            outputs=[SUBJECTS.Output(display_name="subjects")],
        )

    @classmethod
    def execute(
        cls, image, label, weight, start_percent, end_percent, priority, invert_mask, mask=None, subjects=None
    ) -> io.NodeOutput:
        subject = Subject.from_image(
            image, mask, invert_mask=invert_mask, label=label.strip(), weight=float(weight),
            start_percent=float(start_percent), end_percent=float(end_percent), priority=int(priority),
        )
        return io.NodeOutput((subjects or Subjects()).append(subject))
