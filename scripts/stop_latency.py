#!/usr/bin/env python3
"""Seconds from a stop signal to `dgucdir train`'s exit 75, sent while the run clusters or evaluates.

    python scripts/stop_latency.py --during clustering configs/demo.yaml train.warmup_epochs=1 ...
    python scripts/stop_latency.py --during evaluation configs/demo.yaml train.eval_every=1 ...

Starts the training, waits for the log line that opens the phase ("embedding the training images
for k-means" or "evaluating ... on the unseen domains"), sends the signal, and prints one JSON line:
the phase, the signal, the seconds to exit and the exit status (75: stopped with a checkpoint,
resumable). A stop is agreed between domains of the embedding and between scored pairs, so the
latency is at most about one domain's embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

MARKERS = {"clustering": "embedding the training images for k-means", "evaluation": "on the unseen domains"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--during", choices=sorted(MARKERS), required=True)
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGUSR1"])
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds in all")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    proc = subprocess.Popen([sys.executable, "-m", "dgucdir", "train", args.config, *args.overrides],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = threading.Event()
    tail: list[str] = []

    def watch() -> None:
        for line in proc.stderr:
            tail.append(line)
            del tail[:-20]
            if MARKERS[args.during] in line and "retrieval on unseen" not in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    if not seen.wait(args.timeout):
        proc.kill()
        raise SystemExit(f"stop_latency: no {args.during} within {args.timeout:.0f} s:\n{''.join(tail)}")
    sent = time.perf_counter()
    proc.send_signal(getattr(signal, args.signal))
    rc = proc.wait(timeout=args.timeout)
    took = time.perf_counter() - sent
    print(json.dumps({"during": args.during, "signal": args.signal, "seconds_to_exit": round(took, 2),
                      "exit_status": rc}))
    return 0 if rc == 75 else 1


if __name__ == "__main__":
    sys.exit(main())
