# `make test` and `make demo` work on a fresh machine: the virtual environment is built from
# requirements.txt the first time (and again whenever requirements.txt changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

# CPU demo: a tiny Twins-SVT (alt_gvt_micro, 32x32) on scikit-learn's handwritten digits, then an
# evaluation of the saved checkpoint; the epoch log is copied to logs/demo_log.txt for the README.
demo: $(STAMP)
	$(PY) tools/prepare_digits.py --out data/digits --size 32
	rm -rf output/demo
	$(PY) main.py --config configs/demo_digits.yaml
	$(PY) main.py --config configs/demo_digits.yaml --eval --resume output/demo/checkpoint.pth
	mkdir -p logs
	cp output/demo/log.txt logs/demo_log.txt
