# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv and installs the pinned dependencies (requirements.lock) first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench soak chaos abuse clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: $(BIN)/.installed
	$(BIN)/idlemesh devnet demo -n 3 --jobs 12

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/matcher.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/microbatch.py
	$(BIN)/python bench/executor.py
	$(BIN)/python bench/trust.py
	$(BIN)/python bench/energy_claim.py
	$(BIN)/python bench/scale.py

soak: $(BIN)/.installed  # 10 providers, default offer lifetime, 10 minutes, a bootstrap restart at minute 5
	$(BIN)/python bench/soak.py --providers 10 --minutes 10 --restart-bootstrap-at 5

abuse: $(BIN)/.installed  # Sybil flood, sync size and provider RSS under large requests (about 4 minutes)
	$(BIN)/python bench/abuse.py

chaos: $(BIN)/.installed  # 30 seeded random fault schedules against settlement, then the invariants (about 10 minutes)
	$(BIN)/python bench/chaos.py --schedules 30 --seed 1

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
