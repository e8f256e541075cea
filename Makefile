# `make demo` and `make test` work on a fresh machine with only Python 3.10+ and make.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test blas clean

# constraints.txt pins every dependency to the versions the tests and benchmarks were run with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	@$(MAKE) --no-print-directory blas
	@$(VENV)/bin/python -m lazarus_blas_hook install >/dev/null  # fast BLAS whatever a script imports first
	@touch $(STAMP)

# Linux CPU fast path: MLX's wheel links a reference BLAS; an OpenBLAS makes matmul ~30x faster.
# Installed from Debian's packages when we are root and it is missing (lazarus warns otherwise).
blas:
	@if [ "$$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas0-pthread (fast CPU matmul for MLX)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null \
	      || echo "warning: could not install libopenblas0-pthread; training will be slow"; \
	  else \
	    echo "note: for ~20x faster CPU training run: sudo apt-get install -y libopenblas0-pthread"; \
	  fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/lazarus demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) demo_output .pytest_cache
