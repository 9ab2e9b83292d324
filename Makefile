# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
SETUP := .venv/.setup-stamp

.PHONY: setup demo test test-fast bench clean slurm-up slurm-down imagenet-audit

$(SETUP): pyproject.toml constraints.txt scripts/setup-env.sh
	bash scripts/setup-env.sh

setup: $(SETUP)

demo: $(SETUP)
	$(PY) -m pipeline.cli run configs/demo.yaml
	@echo "demo finished: see results/demo/report.md"

test: $(SETUP)
	$(PY) -m pytest -q

test-fast: $(SETUP)
	$(PY) -m pytest -q -m "not slow"

bench: $(SETUP)
	$(PY) -m bench.marking
	$(PY) -m bench.survival
	$(PY) -m bench.audit
	$(PY) -m bench.loader
	$(PY) -m bench.lightning
	@echo "benchmarks written under results/bench/ and results/marking/"

slurm-up:  # a real single-node SLURM cluster on this Debian machine (root), for the SLURM tests
	bash slurm/setup-local-slurm.sh

slurm-down:
	bash slurm/teardown-local-slurm.sh

clean:
	rm -rf runs .pytest_cache
