"""Test-only ComfyUI node pack, loaded next to multisubject by the server tier.

Tiny-model loaders (and other fixtures that must never ship) live here, so the API workflows can
run through a real server without real weights. Node ids use the MSTest_ prefix.
"""

from comfy_api.latest import ComfyExtension, io


class RegionMeanColour(io.ComfyNode):
    """Reports the mean colour of an image inside a normalised box, for pixel checks through /history."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_RegionMeanColour",
            category="_for_testing/multisubject",
            inputs=[io.Image.Input("image"), io.String.Input("box", default="0,0,1,1")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, box) -> io.NodeOutput:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
        _, height, width, _ = image.shape
        crop = image[0, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)]
        return io.NodeOutput(ui={"mean_rgb": crop.reshape(-1, crop.shape[-1]).mean(0).tolist()})


class FixtureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [RegionMeanColour]


async def comfy_entrypoint():
    return FixtureExtension()
