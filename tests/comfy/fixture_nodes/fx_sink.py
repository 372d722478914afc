"""A sink for any value: makes a prompt run a node whose output no shipped output node takes (e.g. a loader)."""

from comfy_api.latest import io


class Sink(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_Sink",
            category="_for_testing/multisubject",
            inputs=[io.AnyType.Input("value")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        return io.NodeOutput(ui={"type": [type(value).__name__]})


NODES = [Sink]
