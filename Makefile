# `make demo`: set up, fetch + convert the default model, fine-tune it on the shipped task, compare.
# `make test`: set up and run the test suite (GPU tests skip on CPU).
# `make lock`: re-resolve pyproject.toml's ranges in a throwaway venv and pin them in constraints.txt.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
UV     := uv==0.13.9
LOCK   ?= constraints.txt

.PHONY: demo test setup lock clean

setup: $(STAMP)

# Everything is installed by uv, which resolves, downloads and unpacks in parallel (`make setup`
# on 2 cores: 9 s, against 98 s with pip). torch is pinned: pip's configuration on the CPU machines
# points the pin at the local CPU wheel (a find-links folder), and an unpinned torch pulled in by
# another package would be the multi-GB CUDA build. uv does not read pip's configuration, so
# pip's find-links are handed to it. Everything else comes at the exact versions in
# constraints.txt (torch stays out of that file because its build, +cpu or CUDA, differs by
# machine). If uv cannot install (its network, its resolver), pip installs the same pins.
#
# Bytecode: the environment may set PYTHONDONTWRITEBYTECODE, and then every process would compile
# transformers and torch from source (20 s of imports instead of 7 s for the demo). The commands
# make runs let Python cache the bytecode of what they import, in .venv, the first time; that
# compiles the ~3,500 modules the demo imports once, where byte-compiling the whole environment
# at install time (uv --compile-bytecode) takes 25 s for ~15,000.
unexport PYTHONDONTWRITEBYTECODE

FIND_LINKS = $(shell python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | tr ' ' '\n' | sort -u)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(UV)
	$(VENV)/bin/uv pip install -q --python $(PY) $(addprefix --find-links ,$(FIND_LINKS)) \
	  -c constraints.txt -e '.[dev]' $(TORCH) \
	  || $(PY) -m pip install -q -c constraints.txt -e '.[dev]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train recipes/demo.yaml

# Two pytest workers (pytest-xdist): the suite is mostly compiling, importing and starting
# subprocesses, one core's work each: on 2 cores a fresh clone takes 8.5-9.5 minutes instead of 12.5-15.
# `make test JOBS=1` runs it in one process.
JOBS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 1,$(JOBS)),,-n $(JOBS))

# The newest releases pyproject.toml allows, as one fresh install resolves them (nothing is run).
# Written to a temporary name and renamed, so a failed resolve leaves the old pins in place;
# --no-compile: the venv is thrown away, byte-compiling it would only cost time.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp" "$(LOCK).tmp"' EXIT; \
	python3 -m venv "$$tmp/venv"; py="$$tmp/venv/bin/python"; \
	$$py -m pip install -q --upgrade pip; \
	$$py -m pip install -q --no-compile $(TORCH); \
	$$py -m pip install -q --no-compile -e '.[dev]' $(TORCH); \
	{ echo "# Exact versions \`make setup\` installs (pip install -c constraints.txt); torch is pinned in the Makefile."; \
	  echo "# Written by \`make lock\`: a fresh venv ($$($$py -V)), $(TORCH), then pip install -e '.[dev]'"; \
	  echo "# within pyproject.toml's ranges; this is its pip freeze without the project and torch."; \
	  $$py -m pip freeze --exclude-editable | grep -vi '^torch=='; } > "$(LOCK).tmp"; \
	mv "$(LOCK).tmp" "$(LOCK)"

clean:
	rm -rf $(VENV) runs
