# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench fuzz soak lock clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m client.demo

test: setup
	@bash scripts/test.sh

lint: setup
	@$(VENV)/bin/ruff check daemon client tests bench

bench: setup
	$(PY) bench/engine.py
	$(PY) bench/lora.py
	$(PY) bench/prebuild.py
	$(PY) bench/daemon.py

# 1,000,000 fuzzed request bodies against `easel serve --preset tiny`; prints its figures and invariants
fuzz: setup
	$(PY) scripts/fuzz_daemon.py --inputs 1000000

# ten minutes of a live game against `easel serve --preset tiny`: renders of every kind, cancels, hang-ups,
# a LoRA rewritten, bad requests; prints its figures and invariants
soak: setup
	$(PY) scripts/soak_daemon.py --minutes 10

lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .venv-thin .pytest_cache
