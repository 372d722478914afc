"""Scoring fixtures: report a FLOAT output through /history (ui key ``value``)."""

from comfy_api.latest import io


class ReportFloat(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MSTest_ReportFloat",
            category="_for_testing/multisubject",
            inputs=[io.Float.Input("value", force_input=True)],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        return io.NodeOutput(ui={"value": [float(value)]})


NODES = [ReportFloat]
