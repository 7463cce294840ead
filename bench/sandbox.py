"""Cost of the bubblewrap sandbox against the in-process guard, side by side in one run.

    python bench/sandbox.py            # all 164 HumanEval canonical solutions, a few minutes on 2 CPU cores
    python bench/sandbox.py --n 20     # the first 20

Each canonical solution runs as HumanEval scores it (`prompt + canonical_solution` as the solution,
`test + check(entry_point)` as the instrumented test) through `run_in_sandbox` with `mode="guard"`
(a plain child interpreter with the audit hook) and `mode="bwrap"` (the OS-level sandbox), the two
modes alternating in order from one problem to the next so that drifts of the machine's load fall on
both alike. One unmeasured run per mode comes first (it pays the one-time checks: whether bubblewrap
runs, the interpreter's layout, the network-namespace probe). Printed: the wall time of every
problem in each mode and their ratio, then the median and total per mode and the ratios, and how
many solutions passed (all must: every assert of every test reached and held).
"""

from __future__ import annotations

import argparse
import statistics
import time

from alphatoken.eval.humaneval import check_test, load_problems
from alphatoken.eval.sandbox import run_in_sandbox

MODES = ("guard", "bwrap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=164, help="first N HumanEval problems (164 = all)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="wall-clock limit per program")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    args = parser.parse_args()
    problems = load_problems(limit=args.n)

    def timed(problem: dict, mode: str):
        start = time.perf_counter()
        result = run_in_sandbox(problem["prompt"] + problem["canonical_solution"], args.timeout_s, args.memory_mb,
                                test=check_test(problem), mode=mode)
        return time.perf_counter() - start, result

    first = next(iter(problems.values()))
    for mode in MODES:
        timed(first, mode)  # one-time checks, not measured
    seconds = {mode: [] for mode in MODES}
    failures = {mode: [] for mode in MODES}
    print(f"{'task':<16}{'guard s':>10}{'bwrap s':>10}{'bwrap/guard':>13}{'asserts':>9}")
    for i, (task_id, problem) in enumerate(problems.items()):
        row = {}
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            elapsed, result = timed(problem, mode)
            seconds[mode].append(elapsed)
            row[mode] = (elapsed, result)
            if not result.passed:
                failures[mode].append(f"{task_id} ({result.status})")
        guard, bwrap = row["guard"][0], row["bwrap"][0]
        print(f"{task_id:<16}{guard:>10.3f}{bwrap:>10.3f}{bwrap / guard:>13.2f}{row['bwrap'][1].asserts:>9}")
    n = len(problems)
    median = {mode: statistics.median(seconds[mode]) for mode in MODES}
    total = {mode: sum(seconds[mode]) for mode in MODES}
    print(f"\n{n} problems")
    for mode in MODES:
        print(f"{mode:>6}: median {median[mode]:.3f} s, total {total[mode]:.1f} s, "
              f"passed {n - len(failures[mode])}/{n}" + (f", failed: {failures[mode]}" if failures[mode] else ""))
    print(f"bwrap / guard: {median['bwrap'] / median['guard']:.2f}x (medians), "
          f"{total['bwrap'] / total['guard']:.2f}x (totals)")


if __name__ == "__main__":
    main()
