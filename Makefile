# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: run test lint format test-backends bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install only when the requirements change.
$(VENV)/.installed-run: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt requirements-ray.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/python -m retrain.service  # warm model workers start first (TF loads there)
	@# The workers outlive a server on purpose (replicas share them); this one's end stops them.
	trap '$(BIN)/python -m retrain.service --stop >/dev/null' EXIT; trap 'exit 130' INT TERM; \
		$(BIN)/streamlit run app.py --server.port $(PORT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two test processes, one test file each at a time (module fixtures such as a Ray head stay
# in one process): the browser, Ray and worker tests mostly wait on servers and workers.
TEST_PROCESSES ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# The training tests again on the JAX backend (CPU). Installs JAX into the venv on first use.
# test_devices.py also runs its multi-device tests (JAX DataParallel over 2 virtual CPUs).
# Two processes, a file each: 1 min 55 s instead of 3 min 41 s on the 2-core CI host.
test-backends: $(VENV)/.installed-dev
	$(BIN)/python -c "import jax" 2>/dev/null || $(BIN)/pip install -q -r requirements-jax.txt
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile \
		-m "not browser" tests/test_train.py \
		tests/test_surgery.py tests/test_evaluate.py tests/test_devices.py

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
