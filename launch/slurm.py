"""`python -m launch.slurm ...` = `dgucdir submit ...`; the launcher lives in dgucdir/submit.py
so that the pickled job is importable on every node wherever the job starts."""

import sys

from dgucdir.submit import main

if __name__ == "__main__":
    sys.exit(main())
