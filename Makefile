# Every target creates .venv when missing and installs the project with its dev extra,
# so a fresh clone needs nothing but python3 (>= 3.10) with venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench screenshots lint clean system-deps

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { $(MAKE) system-deps && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@$(MAKE) --no-print-directory system-deps
	@touch $(STAMP)

# Qt's offscreen platform still needs a few shared libraries that minimal images lack.
system-deps:
	@missing=""; \
	for lib in libEGL.so.1 libGL.so.1 libxkbcommon.so.0 libfontconfig.so.1 libdbus-1.so.3 libglib-2.0.so.0; do \
	  ldconfig -p | grep -q "$$lib" || missing="$$missing $$lib"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system libraries for Qt:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0 python3-venv >/dev/null; \
	fi

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python main.py demo

# The quick set (< 10 min on 2 cores); see README for the 1,000,000-vector run.
bench: $(STAMP)
	$(BIN)/python -m bench.engine --n 10000,100000 --d 64,128 --kinds gaussian,realistic \
	  --query-modes near,fresh --queries 100 --json bench/results/engine.json
	$(BIN)/python -m bench.ingest --images 200 --workers 2 --json bench/results/ingest.json
	$(BIN)/python -m bench.e2e --n 100000 --queries 30 --json bench/results/e2e.json

screenshots: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m app.gui.screenshots docs/screenshots

lint: $(STAMP)
	$(BIN)/ruff check app crypto cloud bench tests main.py
	$(BIN)/mypy --strict crypto

clean:
	rm -rf $(VENV) build *.egg-info
