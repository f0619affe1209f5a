# The two commands of the README. Both create (or reuse) the virtual environment first
# (scripts/setup_env.sh prints its python; a failed install stops here with the pip log).
.PHONY: demo test
demo:  ## install, build + pack the demo data, train on two domains, evaluate on the two unseen ones
	@PY=$$(bash scripts/setup_env.sh) && $$PY -m dgucdir demo

test:  ## install and run the test suite (brings up a private one-node SLURM for the launcher tests)
	@PY=$$(bash scripts/setup_env.sh) && OMP_NUM_THREADS=2 $$PY -m pytest -q
