# `make demo` and `make test` do all the set-up on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= a lighthouse on a cliff in a storm, oil painting

.PHONY: demo up test install clean

install: $(VENV)/.installed

# torch is pinned to 2.13.0 (the CPU wheel); optimum-intel requires torchvision, and the torchvision that
# matches that torch is a CUDA build that breaks `import transformers` beside it: nothing here uses it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip uninstall --quiet -y torchvision
	touch $@

# The main job: local Redis (bundled if none answers) + SQLite + API + one worker on the tiny model;
# submits a prompt, writes out/demo.png, prints the job record, and stops everything.
demo: install
	$(BIN)/sdfleet up --submit "$(PROMPT)" --out out/demo.png --log-dir out

# The local stack, kept running until Ctrl-C (which stops all of it): the API on :8000 (a free port, said so,
# when 8000 is busy), one worker on SDFLEET_MODEL (default: the tiny model), one ops worker; logs in out/.
up: install
	$(BIN)/sdfleet up --log-dir out

# --no-loadscope-reorder: xdist would otherwise start the files with the most tests first, and the longest ones
# (FILE_SECONDS in tests/conftest.py: few tests, minutes each) would end the run alone
test: install
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) out sdfleet.db sdfleet.db-wal sdfleet.db-shm sdfleet.db.migrate.lock
