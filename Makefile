# The two commands a newcomer needs: `make demo` and `make test`. Only Python 3.11 is assumed.
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
OUT   ?= out
DIGITS := src/edgeclip/data/tiny/heldout

.PHONY: demo test bench install browser clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel; anything unpinned would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Export the built-in model with a baked zero-shot head, classify held-out digits, time it.
demo: $(VENV)/.installed
	$(BIN)/edgeclip export builtin:tiny --target onnx --labels "$$($(BIN)/python -c 'from edgeclip.builtin import digit_labels; print(",".join(digit_labels()))')" --out $(OUT)/tiny-onnx --overwrite
	$(BIN)/edgeclip run $(OUT)/tiny-onnx --top-k 2 --image $$(for d in 0 1 2 3 4 5 6 7 8 9; do ls $(DIGITS)/$$d/*.png | head -n 1; done)
	$(BIN)/edgeclip bench $(OUT)/tiny-onnx --batch 1,8 --seconds 1

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -q

# Headless Chromium (Debian's package) renders the bench report's HTML in tests/test_bench.py.
browser:
	@command -v chromium >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: chromium missing and not installable here (as root: apt-get install -y chromium)" >&2

# pytest-benchmark suites (not part of `make test`): speed goals, side by side, medians.
bench: $(VENV)/.installed
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only

clean:
	rm -rf $(OUT) .pytest_cache .benchmarks
