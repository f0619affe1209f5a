# The two commands of the README. Both create (or reuse) the virtual environment first
# (scripts/setup_env.sh prints its python; a failed install stops here with the pip log).
.PHONY: demo test test-gpu results
demo:  ## install, build + pack the demo data, train on two domains, evaluate on the two unseen ones
	@PY=$$(bash scripts/setup_env.sh) && $$PY -m dgucdir demo

test:  ## install and run the test suite on 2 workers (brings up private SLURM clusters for the launcher tests)
	@PY=$$(bash scripts/setup_env.sh) && OMP_NUM_THREADS=1 $$PY -m pytest -q -n $${TEST_WORKERS:-2} --dist loadfile

test-gpu:  ## on a machine with a CUDA GPU: the gpu-marked tests, then the GPU benchmarks as JSON under runs/gpu-check
	@PY=$$(bash scripts/setup_env.sh) && PYTHON=$$PY bash scripts/gpu_check.sh

results:  ## docs/RESULTS.md from one code: the demo's 5 standard variants and shapes' full/no_fourier/rgb_only plus the partner bank, 3 seeds each (hours on a CPU; continues from the runs docs/results/*.json record)
	@PY=$$(bash scripts/setup_env.sh) && \
	$$PY -m dgucdir ablate configs/demo.yaml --jobs $${JOBS:-2} --variants full no_fourier no_phase_mix rgb_only no_cluster --out runs/results-demo --report docs/RESULTS.md && \
	$$PY -m dgucdir ablate configs/shapes.yaml --jobs $${JOBS:-2} --variants full no_fourier rgb_only bank_partner --out runs/results-shapes --report docs/RESULTS.md
