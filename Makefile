# The two commands (see README): `make run` (main job) and `make test` (tests). Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint workflows
setup:
	@bash scripts/setup.sh

# main job: ComfyUI headless + this pack runs the AnyMS SDXL workflow when its model files are in ComfyUI's models
# folders, else the layout preview (after listing the missing files and their folders); images land in output/.
# `make run WORKFLOW=<name>` runs any workflow in workflows/api.
WORKFLOW ?=
run: setup
	$(PY) -m multisubject run-workflow $(WORKFLOW) --out output

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

# regenerate the UI-format workflows/*.json from their API twins in workflows/api/
workflows: setup
	$(PY) scripts/workflow_tools.py
