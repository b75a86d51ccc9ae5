# Every target creates .venv when missing and installs the project with its dev extra,
# so a fresh clone needs nothing but python3 (>= 3.10) with venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test soak demo bench screenshots lint clean system-deps sbom

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { $(MAKE) system-deps && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@$(MAKE) --no-print-directory system-deps
	@touch $(STAMP)

# System libraries, installed through apt-get (Debian/Ubuntu) when one is missing: the few that
# Qt's offscreen platform needs, the xcb platform's (the desktop client on an X display, and the
# GUI test under Xvfb), Xvfb itself, python3-venv, and the real PACS and DICOM tools the
# integration tests run as separate servers (Orthanc with its DICOMweb plugin, dcmtk; both GPL,
# never imported). Each entry is "file:package": the file
# (a library ldconfig knows, or a program on PATH) shows whether the package is there. Other
# distributions: README.md, "System libraries".
SYSTEM_DEPS := \
  libEGL.so.1:libegl1 libGL.so.1:libgl1 libxkbcommon.so.0:libxkbcommon0 \
  libfontconfig.so.1:libfontconfig1 libdbus-1.so.3:libdbus-1-3 libglib-2.0.so.0:libglib2.0-0 \
  libxcb-cursor.so.0:libxcb-cursor0 libxkbcommon-x11.so.0:libxkbcommon-x11-0 \
  libxcb-icccm.so.4:libxcb-icccm4 libxcb-image.so.0:libxcb-image0 \
  libxcb-keysyms.so.1:libxcb-keysyms1 libxcb-randr.so.0:libxcb-randr0 \
  libxcb-render-util.so.0:libxcb-render-util0 libxcb-shape.so.0:libxcb-shape0 \
  libxcb-xinerama.so.0:libxcb-xinerama0 libxcb-xkb.so.1:libxcb-xkb1 Xvfb:xvfb \
  storescu:dcmtk /usr/sbin/Orthanc:orthanc \
  /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb

system-deps:
	@missing=""; \
	for entry in $(SYSTEM_DEPS); do \
	  file=$${entry%%:*}; package=$${entry#*:}; \
	  case "$$file" in \
	    /*) [ -e "$$file" ] || missing="$$missing $$package" ;; \
	    *.so.*) ldconfig -p | grep -q "$$file" || missing="$$missing $$package" ;; \
	    *) command -v "$$file" >/dev/null 2>&1 || missing="$$missing $$package" ;; \
	  esac; \
	done; \
	$(PYTHON) -c "import ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "missing system packages (Debian names):$$missing; see README.md, System libraries"; \
	    exit 0; \
	  fi; \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    $$missing >/dev/null; \
	fi

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -p no:cacheprovider -m "not soak"

# The long reliability runs (README, "Soak"): under 15 minutes on 2 cores.
soak: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -p no:cacheprovider -m soak

demo: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python main.py demo

# The quick set (< 10 min on 2 cores); see README for the 1,000,000-vector run.
bench: $(STAMP)
	$(BIN)/python -m bench.engine --n 10000,100000 --d 64,128 --kinds gaussian,realistic \
	  --query-modes near,fresh --queries 100 --json bench/results/engine.json
	$(BIN)/python -m bench.ingest --images 200 --workers 2 --json bench/results/ingest.json
	$(BIN)/python -m bench.e2e --n 100000 --queries 30 --json bench/results/e2e.json
	$(BIN)/python -m bench.receive --images 200 --repeat 2 --out bench/results/receive.json

# The release's software bill of materials (CycloneDX JSON, docs/DEPLOYMENT.md "SBOM"), made
# offline from the packages installed in .venv, then the licence gate: no GPL/AGPL package
# but PyQt6, and PyQt6 only in the gui extra (.ci/sbom_licences.py says why).
SBOM := dist/sbom.cdx.json
sbom: $(STAMP)
	@mkdir -p $(dir $(SBOM))
	$(BIN)/cyclonedx-py environment --output-reproducible --output-format JSON \
	  --output-file $(SBOM) $(VENV)
	$(BIN)/python .ci/sbom_licences.py $(SBOM) --setup-cfg setup.cfg

screenshots: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m app.gui.screenshots docs/screenshots

lint: $(STAMP)
	$(BIN)/ruff check app crypto cloud bench tests main.py
	$(BIN)/mypy --strict crypto
	$(BIN)/lint-imports .importlinter

clean:
	rm -rf $(VENV) build dist *.egg-info
