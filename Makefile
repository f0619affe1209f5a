# The two commands of the README. Both create (or reuse) the virtual environment first.
PY = $(shell bash scripts/setup_env.sh)

.PHONY: demo test
demo:  ## install, build + pack the demo data, train on two domains, evaluate on the two unseen ones
	$(PY) -m dgucdir demo

test:  ## install and run the test suite (brings up a private one-node SLURM for the launcher tests)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q
