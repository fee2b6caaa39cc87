# crossmodal: `make demo` runs the main job, `make test` runs the tests. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CM     := $(VENV)/bin/crossmodal
STAMP  := $(VENV)/.installed
# torch first, pinned to the build these machines carry; override for your platform, e.g. TORCH=torch
TORCH  ?= torch==2.14.1 torchvision==0.29.1

MODEL      ?= ViT-B-32
PRETRAINED ?= laion2b_s34b_b79k
DEMO       ?= .demo
DEMO_UI    ?= 1

# make test runs the suite twice, with the CPU features faked (CROSSMODAL_CPU_FLAGS) as an AVX2-only CPU and
# as one with fast bf16, so the fp32 and the bf16 paths are both tested on whatever CPU runs it. The PostgreSQL
# catalog tests (marker postgres) do not depend on the CPU's features: the second run leaves them out.
CPU_AVX2 := avx2 fma
CPU_BF16 := avx2 fma avx512f avx512_bf16 amx_bf16

.PHONY: venv test test-fast demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,cluster]'
	touch $(STAMP)

test: $(STAMP)
	CROSSMODAL_CPU_FLAGS="$(CPU_AVX2)" $(PY) -m pytest -q
	CROSSMODAL_CPU_FLAGS="$(CPU_BF16)" $(PY) -m pytest -q -m "not postgres and not cluster"

# The inner loop: no slow tests, real CPU features.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) demo/fetch_photos.py $(DEMO)/photos
	@$(CM) --home $(DEMO)/home index $(DEMO)/photos --model $(MODEL) --pretrained $(PRETRAINED) || { \
	  echo ""; \
	  echo "make demo: could not load $(MODEL) weights ($(PRETRAINED))."; \
	  echo "  Run it with a local open_clip checkpoint: make demo PRETRAINED=/path/to/checkpoint.pt"; \
	  exit 2; }
	$(CM) --home $(DEMO)/home add-texts demo/captions.txt --corpus demo
	$(CM) --home $(DEMO)/home search "a cat lying on a blanket" -k 5
	$(CM) --home $(DEMO)/home search "an astronaut" --not "a flag" -k 3
	$(CM) --home $(DEMO)/home caption $$(ls $(DEMO)/photos/* | head -1) -k 3
	$(CM) --home $(DEMO)/home info
	@if [ "$(DEMO_UI)" = "1" ]; then $(CM) --home $(DEMO)/home ui; fi

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
