# Set-up and entry points. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install chromium demo test test-fast bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The browser tests drive Debian's chromium through Playwright (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else sudo -n apt-get update -qq && sudo -n apt-get install -y -qq chromium; fi \
	  || echo "warning: could not install chromium; the browser tests will be skipped"; }

# `make demo` runs the shapes organism, whose circuit and truth are known;
# `make demo ORGANISM=cifar10` runs the CIFAR-10 organism, the negative control.
ORGANISM ?= shapes
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vitcircuits demo --organism $(ORGANISM) --out runs/demo-$(ORGANISM)

test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) runs .pytest_cache
