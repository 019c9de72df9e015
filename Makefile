# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
OUT_ALL ?= runs/all

.PHONY: setup demo demo-all test figure clean
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup  ## phantom cohort -> train -> tune -> score -> analyze, on the small CPU preset
	$(BIN)/python -m jobs.pipeline --out $(OUT)

demo-all: setup  ## all eight methods in one run on the small preset; prints them beside the papers' numbers
	$(BIN)/python -m jobs.pipeline --out $(OUT_ALL) --methods CAM GradCAM GradCAM++ ScoreCAM Threshold UNet MIP-CAM BoxFCN --unet-members 3

test: setup  ## the whole test suite (CI runs exactly this)
	$(BIN)/python -m pytest -q

figure: setup  ## a PNG of one phantom study (coronal MIP with SEG contour, axial PET and CT)
	$(BIN)/python -m wsseg_core.phantom $(OUT)/phantom --n 2 --figure $(OUT)/phantom.png

clean:
	rm -rf $(VENV) runs .pytest_cache
