"""Equivalence fuzzing at scale: the checks of tests/test_fuzz.py on many more random networks.

    .venv/bin/python bench/fuzz.py --examples 5000 --workers 2 --seed 12345

Unlike the test, a mismatch does not stop the run (and is not shrunk): every failure is recorded with its spec, its features and a reproducer. Worker i draws with
hypothesis seed S + i; `--backend-percent` of the exact examples also go through
torch.compile(backend="depthprune"). Writes bench/results/fuzz.json (count, mismatches, seconds, per-feature
counts of examples and of failures, failures grouped by kind, plan refusals by kind, failures).
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_EVERY = 50
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def error_kind(error: str) -> str:
    """A failure's message without its numbers and spec, to group failures of one kind."""
    return re.sub(r"[0-9.e+-]+[0-9]", "N", error.split(" for spec")[0])[:120]


def reproducer(spec: dict) -> str:
    return f"PYTHONPATH=.:tests python -c \"from fuzz_nets import check; check({spec!r})\""


def run_worker(job: tuple[int, int, int]) -> dict:
    """Fuzz `examples` networks drawn with hypothesis seed `seed`; progress and failures go to stdout as
    they happen, so that an interrupted run still tells how far it got."""
    examples, seed, backend_percent = job
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from fuzz_nets import check, features, networks

    torch.set_num_threads(1)
    result = {"count": 0, "failures": [], "worst_relative_error": 0.0, "worst": None, "features": collections.Counter(),
              "failed_features": collections.Counter(), "refusals": collections.Counter()}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(networks(backend_percent=backend_percent))
    def fuzz(spec):
        index = result["count"]
        result["count"] += 1
        drawn = sorted(features(spec))
        result["features"].update(drawn)
        try:
            error = check(spec)
        except Exception as failure:  # every failure is the finding, kept with its spec
            result["failed_features"].update(drawn)
            result["failures"].append({"seed": seed, "example": index, "features": drawn,
                                       "error": f"{type(failure).__name__}: {failure}"[:2000], "spec": spec,
                                       "reproducer": reproducer(spec)})
            print(f"seed {seed} example {index}: MISMATCH {result['failures'][-1]['error'][:300]}", flush=True)
            return
        if isinstance(error, str):
            result["refusals"][f"{spec['action']}: {error_kind(error)}"] += 1
        else:
            if error > result["worst_relative_error"]:
                result["worst_relative_error"], result["worst"] = error, {"seed": seed, "example": index, "spec": spec}
        if result["count"] % PROGRESS_EVERY == 0:
            print(f"seed {seed}: {result['count']} networks, {len(result['failures'])} mismatches", flush=True)

    fuzz()
    return result


def summarize(results: list[dict], seeds: list[int], seconds: float) -> dict:
    failures = [failure for result in results for failure in result["failures"]]
    drawn = sum((result["features"] for result in results), collections.Counter())
    failed = sum((result["failed_features"] for result in results), collections.Counter())
    errors = collections.Counter(error_kind(failure["error"]) for failure in failures)
    refusals = sum((result["refusals"] for result in results), collections.Counter())
    return {"count": sum(result["count"] for result in results), "mismatches": len(failures),
            "seconds": round(seconds, 1),
            "worst_relative_error": max(result["worst_relative_error"] for result in results),
            "worst": max(results, key=lambda result: result["worst_relative_error"])["worst"], "seeds": seeds,
            "features": {name: {"examples": drawn[name], "failures": failed[name]} for name in sorted(drawn)},
            "error_kinds": dict(errors.most_common()), "refusals": dict(refusals.most_common()),
            "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend-percent", type=int, default=5,
                        help="percent of the exact examples also compiled with backend='depthprune'")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    share, extra = divmod(args.examples, args.workers)
    jobs = [(share + (i < extra), args.seed + i, args.backend_percent) for i in range(args.workers)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run_worker, jobs)
    summary = summarize(results, [seed for _, seed, _ in jobs], time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: summary[key] for key in ("count", "mismatches", "seconds", "worst_relative_error",
                                                    "seeds", "error_kinds", "refusals")}))
    return 1 if summary["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
