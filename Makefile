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

# Everything is installed by uv, which resolves, downloads, unpacks and byte-compiles in parallel
# (`make setup` on 2 cores, download caches warm: 31 s, against 52 s with torch unpacked by pip and
# 98 s with pip for all). torch is pinned: pip's configuration on the CPU machines points the pin
# at the local CPU wheel (a find-links folder), and an unpinned torch pulled in by another package
# would be the multi-GB CUDA build. uv does not read pip's configuration, so pip's find-links are
# handed to it. Everything else comes at the exact versions in constraints.txt (torch stays out of
# that file because its build, +cpu or CUDA, differs by machine). The .pyc files are written at
# install time because the environment may set PYTHONDONTWRITEBYTECODE, and then every process
# would compile transformers from source. If uv cannot install (its network, its resolver), pip
# installs the same pins.
FIND_LINKS = $(shell python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | tr ' ' '\n' | sort -u)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(UV)
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode $(addprefix --find-links ,$(FIND_LINKS)) \
	  -c constraints.txt -e '.[dev]' $(TORCH) \
	  || $(PY) -m pip install -q -c constraints.txt -e '.[dev]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train recipes/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

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
