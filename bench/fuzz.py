"""Equivalence fuzzing at scale: the checks of tests/test_fuzz.py on many more random networks.

    .venv/bin/python bench/fuzz.py --examples 5000 --workers 2

Unlike the test, a mismatch does not stop the run (and is not shrunk): every one is recorded with its
spec, to be pasted into a regression test. Writes bench/results/fuzz.json (count, mismatches, seconds).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_EVERY = 50
sys.path.insert(0, str(ROOT / "tests"))


def run_worker(job: tuple[int, int]) -> dict:
    """Fuzz `examples` networks drawn with hypothesis seed `seed`; progress and failures go to stdout as
    they happen, so that an interrupted run still tells how far it got."""
    examples, seed = job
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from fuzz_nets import check, networks

    torch.set_num_threads(1)
    result = {"count": 0, "failures": [], "worst_relative_error": 0.0}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(networks())
    def fuzz(spec):
        result["count"] += 1
        try:
            error = check(spec)
        except Exception as failure:  # every failure is the finding, kept with its spec
            result["failures"].append({"spec": spec, "error": f"{type(failure).__name__}: {failure}"[:2000]})
            print(f"seed {seed}: MISMATCH {result['failures'][-1]}", flush=True)
            return
        result["worst_relative_error"] = max(result["worst_relative_error"], error)
        if result["count"] % PROGRESS_EVERY == 0:
            print(f"seed {seed}: {result['count']} networks, {len(result['failures'])} mismatches", flush=True)

    fuzz()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    share, extra = divmod(args.examples, args.workers)
    jobs = [(share + (i < extra), args.seed + i) for i in range(args.workers)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run_worker, jobs)
    failures = [failure for result in results for failure in result["failures"]]
    summary = {"count": sum(result["count"] for result in results), "mismatches": len(failures),
               "seconds": round(time.perf_counter() - start, 1),
               "worst_relative_error": max(result["worst_relative_error"] for result in results),
               "seeds": [seed for _, seed in jobs], "failures": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: value for key, value in summary.items() if key != "failures"}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
