# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
SETUP := .venv/.setup-stamp

.PHONY: setup demo test lint test-fast bench gpu-check experiments owner-audit owner-power owner-finetune owner-levers clean slurm-up slurm-down imagenet-audit \
	imagenet-like rehearsal scale

$(SETUP): pyproject.toml constraints.txt scripts/setup-env.sh
	bash scripts/setup-env.sh

setup: $(SETUP)

demo: $(SETUP)
	$(PY) -m pipeline.cli run configs/demo.yaml
	@echo "demo finished: see results/demo/report.md"

test: lint  # on every core (pytest-xdist; tests/conftest.py groups what must share a worker)
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=25

lint: $(SETUP)  # seconds: ruff's lint rules and formatting (configured in pyproject.toml)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(SETUP)
	$(PY) -m pytest -q -n auto --dist loadgroup -m "not slow"

bench: $(SETUP)
	$(PY) -m bench.marking
	$(PY) -m bench.survival
	$(PY) -m bench.audit
	$(PY) -m bench.loader
	$(PY) -m bench.lightning
	$(PY) -m bench.owner_speed
	@echo "benchmarks written under results/bench/ and results/marking/"

# On a CUDA machine: every GPU path in one run of under 8 minutes -> results/bench/gpu.json
# (python -m bench.gpu_check --help; --device cpu --tiny is the CPU version the tests run)
gpu-check: $(SETUP)
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

experiments: $(SETUP)  # every table under configs/experiments/ -> results/<table>/ and results/README.md
	$(PY) -m pipeline.cli experiments configs/experiments/*.yaml $(if $(BASE),--base $(BASE))

owner-audit: $(SETUP)  # owners' own mark/audit tool on trained networks -> results/owner-audit/
	$(PY) -m bench.owner_audit $(if $(DESIGNS),--designs $(DESIGNS))

FT := --set train.augment=flip_translate --set run_dir=runs/owner-audit-ft
owner-power: $(SETUP)  # each access level and per-image score on the demo recipe and with flip + translate (hours)
	$(PY) -m bench.owner_audit --designs subset --access logits probs topk:5 label --out results/owner-audit/access
	$(PY) -m bench.owner_audit --designs subset $(FT) --access logits probs topk:5 label \
		--out results/owner-audit/access-flip-translate
	$(PY) -m bench.owner_scores --name demo-recipe --never-trained 20
	$(PY) -m bench.owner_scores --name flip-translate $(FT) --never-trained 30
	$(PY) -m bench.owner_scores --name flip-translate-reference $(FT) --never-trained 0 --reference

FINETUNE := --config configs/owner-finetune.yaml --designs subset
BACKBONE := --pretrain configs/owner-pretrain.yaml
owner-finetune: $(SETUP)  # owners' audit of networks fine-tuned from a backbone without their classes (about 40 min)
	$(PY) -m bench.owner_audit $(FINETUNE) $(BACKBONE) --out results/owner-audit/finetune-full
	$(PY) -m bench.owner_audit $(FINETUNE) $(BACKBONE) --set train.finetune=head --set run_dir=runs/owner-finetune-head \
		--out results/owner-audit/finetune-head
	$(PY) -m bench.owner_audit $(FINETUNE) --set run_dir=runs/owner-finetune-scratch --out results/owner-audit/finetune-scratch
	$(PY) -m bench.owner_audit $(FINETUNE) $(BACKBONE) --set train.augment=flip_translate --set run_dir=runs/owner-finetune-ft \
		--out results/owner-audit/finetune-full-flip-translate

# what an owner (K published, mark strength), a trainer (weight decay, epochs, architecture) and the training set's
# size change under flip + translate
LEVER = $(PY) -m bench.owner_audit --designs subset --set train.augment=flip_translate
K40 := --set plan.samples_per_user=40 --set plan.n_nonmember_users=500
K80 := --set plan.samples_per_user=80 --set plan.n_nonmember_users=250
K160 := --set plan.samples_per_user=160 --set plan.owners.images=400 --set plan.owners.never_trained=50 \
	--set plan.n_nonmember_users=150
# a training set 4x larger: its held-out images allow 10 never-trained-on owners (re-keyed 4 times each)
N40K := --set plan.samples_per_user=160 --set plan.owners.images=400 --set plan.owners.never_trained=10 \
	--set plan.n_nonmember_users=50 --set data.n_train=40000 --rekey 4
owner-levers: $(SETUP)  # one training run and 60-920 owner audits per row (about 6 h 30 min alone on 2 cores)
	$(LEVER) $(K40) --set run_dir=runs/owner-audit-ft-k40 --out results/owner-audit/levers/k40
	$(LEVER) --set mark.alpha=0.5 --set run_dir=runs/owner-audit-ft-alpha05 --out results/owner-audit/levers/alpha0.5
	$(LEVER) $(K40) --set mark.alpha=0.5 --set run_dir=runs/owner-audit-ft-k40-alpha05 --out results/owner-audit/levers/k40-alpha0.5
	$(LEVER) $(K80) --set run_dir=runs/owner-audit-ft-k80 --out results/owner-audit/levers/k80
	$(LEVER) $(K80) --set mark.alpha=0.5 --set run_dir=runs/owner-audit-ft-k80-alpha05 --out results/owner-audit/levers/k80-alpha0.5
	$(LEVER) $(K80) --set plan.owners.images=400 --set plan.owners.never_trained=50 --set run_dir=runs/owner-audit-ft-k80-p400 \
		--out results/owner-audit/levers/k80-of-400
	$(LEVER) $(K160) --set run_dir=runs/owner-audit-ft-k160-p400 --arms marked control --rekey 8 \
		--out results/owner-audit/levers/k160-of-400
	$(LEVER) $(K160) --set seed=1 --set run_dir=runs/owner-audit-ft-k160-p400-seed1 \
		--out results/owner-audit/levers/k160-of-400-seed1
	$(LEVER) $(K160) --set seed=2 --set run_dir=runs/owner-audit-ft-k160-p400-seed2 \
		--out results/owner-audit/levers/k160-of-400-seed2
	$(LEVER) $(K160) --set seed=3 --set run_dir=runs/owner-audit-ft-k160-p400-seed3 \
		--out results/owner-audit/levers/k160-of-400-seed3
	$(LEVER) $(N40K) --set run_dir=runs/owner-audit-ft-k160-p400-n40k --out results/owner-audit/levers/k160-of-400-train40k
	$(LEVER) $(N40K) --set seed=1 --set run_dir=runs/owner-audit-ft-k160-p400-n40k-seed1 \
		--out results/owner-audit/levers/k160-of-400-train40k-seed1
	$(LEVER) $(N40K) --set seed=2 --set run_dir=runs/owner-audit-ft-k160-p400-n40k-seed2 \
		--out results/owner-audit/levers/k160-of-400-train40k-seed2
	$(LEVER) $(K160) --set train.arch=wrn10_1 --set run_dir=runs/owner-audit-ft-k160-p400-wrn10 \
		--out results/owner-audit/levers/k160-of-400-wrn10-1
	$(LEVER) --set train.arch=wrn10_1 --set run_dir=runs/owner-audit-ft-wrn10 --out results/owner-audit/levers/recipe-wrn10-1
	$(LEVER) --set train.weight_decay=0.0005 --set run_dir=runs/owner-audit-ft-wd --out results/owner-audit/levers/recipe-wd5e-4
	$(LEVER) --set train.epochs=30 --set run_dir=runs/owner-audit-ft-e30 --out results/owner-audit/levers/recipe-30-epochs

slurm-up:  # a real single-node SLURM cluster on this Debian machine (root), for the SLURM tests
	bash slurm/setup-local-slurm.sh

slurm-down:
	bash slurm/teardown-local-slurm.sh

# The ImageNet-1k recipe on a SLURM cluster: prints the job plan, then submits and follows it.
imagenet-audit: $(SETUP)
	@if [ -z "$(IMAGENET_DIR)" ] || [ -z "$(PARTITION)" ]; then \
	  echo "usage: make imagenet-audit IMAGENET_DIR=/path/to/imagenet PARTITION=<slurm partition> [ACCOUNT=...] [OVERRIDES='key=value ...']"; \
	  echo "  IMAGENET_DIR holds train/ and val/ class folders; the recipe is configs/imagenet-rn50.yaml"; \
	  echo "  (8 GPUs per training job); W&B logs offline unless WANDB=online; OVERRIDES are config --set values"; exit 2; fi
	@[ -d "$(IMAGENET_DIR)/train" ] && [ -d "$(IMAGENET_DIR)/val" ] || \
	  { echo "error: $(IMAGENET_DIR) has no train/ and val/ class folders"; exit 2; }
	$(PY) -m pipeline.cli run configs/imagenet-rn50.yaml --launcher slurm --dry-run $(IMAGENET_ARGS)
	$(PY) -m pipeline.cli run configs/imagenet-rn50.yaml --launcher slurm $(IMAGENET_ARGS)

IMAGENET_ARGS = --set data.root=$(IMAGENET_DIR) --set launch.slurm.partition=$(PARTITION) $(CLUSTER_ARGS)
CLUSTER_ARGS = $(if $(ACCOUNT),--set launch.slurm.account=$(ACCOUNT)) --set wandb.enabled=true \
	--set wandb.mode=$(or $(WANDB),offline) $(foreach o,$(OVERRIDES),--set '$(o)')

# ImageNet-shaped JPEGs (sizes, file sizes and content like ImageNet's; deterministic from SEED):
# make imagenet-like IMAGES=20000 [DIR=data/imagenet-like-20000] [SEED=0]
IMAGES ?= 20000
LIKE_DIR = $(or $(DIR),data/imagenet-like-$(IMAGES))
imagenet-like: $(SETUP)
	$(PY) -m bench.imagenet_like $(LIKE_DIR) --images $(IMAGES) $(if $(SEED),--seed $(SEED))

# The ImageNet recipe rehearsed on CPUs before GPU-hours are spent: every stage, its storage, shards and
# SLURM arrays as configured, a small network for 2 epochs, sizes following the folder. On IMAGENET_DIR
# when given, else on IMAGES ImageNet-shaped images made here; PARTITION defaults to the cluster's own.
rehearsal: $(SETUP)
	@$(if $(IMAGENET_DIR),,$(MAKE) -s imagenet-like IMAGES=$(IMAGES) DIR=$(LIKE_DIR))
	$(PY) -m pipeline.cli run configs/imagenet-rn50.yaml --rehearse --launcher slurm --dry-run $(REHEARSAL_ARGS)
	$(PY) -m pipeline.cli run configs/imagenet-rn50.yaml --rehearse --launcher slurm $(REHEARSAL_ARGS)

# How cost grows with the data: the rehearsal at SIZES images on the local SLURM cluster -> results/bench/scale.*
# (hours on 2 cores; each size is merged into scale.json as it finishes, so sizes can run one at a time)
SIZES ?= 5200 20800 52000
scale: $(SETUP)
	$(PY) -m bench.scale --sizes $(SIZES) $(if $(PARTITION),--partition $(PARTITION))

REHEARSAL_ARGS = --set data.root=$(or $(IMAGENET_DIR),$(LIKE_DIR)) $(if $(PARTITION),--set launch.slurm.partition=$(PARTITION)) \
	$(CLUSTER_ARGS)

clean:
	rm -rf runs .pytest_cache
