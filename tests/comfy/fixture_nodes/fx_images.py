"""Image fixtures for pixel checks through /history."""

from comfy_api.latest import io


class RegionMeanColour(io.ComfyNode):
    """Reports the mean colour of an image inside a normalised box (ui key ``mean_rgb``)."""

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


NODES = [RegionMeanColour]
