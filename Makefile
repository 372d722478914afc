# The two commands (see README): `make run` (main job) and `make test` (tests). Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint workflows
setup:
	@bash scripts/setup.sh

# main job: ComfyUI headless + this pack runs the shipped layout-preview workflow; the PNG lands in output/
run: setup
	$(PY) -m multisubject run-workflow layout_preview --out output

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

# regenerate the UI-format workflows/*.json from their API twins in workflows/api/
workflows: setup
	$(PY) scripts/workflow_tools.py
