# `make demo`: set up, fetch + convert the default model, fine-tune it on the shipped task, compare.
# `make test`: set up and run the test suite (GPU tests skip on CPU).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# torch is installed first and pinned: on the CPU machines the pin resolves to the local CPU wheel,
# and an unpinned torch pulled in by another package would be the multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train recipes/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
