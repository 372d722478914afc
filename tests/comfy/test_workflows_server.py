"""Every shipped workflow parses, uses only existing nodes with valid inputs, and its UI and API forms agree."""

import pytest
from workflow_tools import NOTE_TYPES, api_from_ui, api_workflows, strip_meta, ui_workflows, validate_api


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_every_ui_workflow_has_an_api_twin():
    assert set(ui_workflows()) == set(api_workflows()) and api_workflows()


@pytest.mark.parametrize("name", sorted(api_workflows()))
def test_api_workflow_is_valid(name, object_info):
    assert validate_api(api_workflows()[name], object_info) == []


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_ui_workflow_matches_its_api_twin(name, object_info):
    ui = ui_workflows()[name]
    assert all(node["type"] in object_info or node["type"] in NOTE_TYPES for node in ui["nodes"])
    assert api_from_ui(ui, object_info) == strip_meta(api_workflows()[name])


def test_workflows_are_offered_as_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["multisubject"]) == sorted(ui_workflows())
