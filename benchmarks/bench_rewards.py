"""Throughput of the rewards: sandboxed code tests/s (1 and 2 workers), sandbox overhead per
test vs a bare ``python -c pass``, and math-verify score calls/s. Appends to RESULTS.md.

Run: python benchmarks/bench_rewards.py
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time

from archer.rewards import RewardRunner, run_tests
from archer.rewards.math import score
from archer.rewards.sandbox import SandboxLimits, default_python, isolation_mode, run_program

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
NUM_TESTS = 24
MATH_CASES = [("\\frac{1}{2}", "so \\boxed{0.5}"), ("18", "the answer is 18"), ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"), ("B", "\\boxed{B}")]


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    rows = []
    tests = [{"input": f"{i} {i}\n", "output": f"{2 * i}\n"} for i in range(NUM_TESTS)]
    for workers in (1, 2):
        elapsed = timed(lambda w=workers: run_tests(ADD, tests, timeout_s=5.0, num_workers=w), 2)
        rows.append((f"code tests/s, {workers} worker(s) ({NUM_TESTS} stdin tests)", f"{NUM_TESTS / elapsed:.1f}"))
    python = default_python()
    bare = timed(lambda: subprocess.run([python, "-I", "-c", "pass"], check=True), 20)
    sandboxed = timed(lambda: run_program("pass"), 20)
    rows.append(("bare `python -I -c pass`, ms", f"{bare * 1e3:.1f}"))
    rows.append((f"sandboxed `pass` (mode {isolation_mode()}), ms", f"{sandboxed * 1e3:.1f}"))
    rows.append(("sandbox overhead per test, ms", f"{(sandboxed - bare) * 1e3:.1f}"))
    killed = run_program("while True:\n    pass", "", SandboxLimits(timeout_s=1.0))
    rows.append((f"infinite loop under timeout_s=1.0: {killed.status} after, s", f"{killed.wall_s:.2f}"))
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 5.0:
        for truth, response in MATH_CASES:
            score(response, truth)
            calls += 1
    rows.append(("math score calls/s (in process, 4-case mix)", f"{calls / (time.perf_counter() - start):.1f}"))
    hostile = {
        "megabyte response": "x" * 1_000_000 + " \\boxed{4}",
        "unclosed 100k-deep nest": "\\boxed{" + "{" * 100_000,
        "megabyte number": "9" * 1_000_000,
    }
    for name, response in hostile.items():
        rows.append((f"math score of a {name}, ms", f"{timed(lambda r=response: score(r, '3'), 3) * 1e3:.1f}"))
    tower = "\\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}"
    rows.append(("math score of a power tower under timeout_s=0.5, ms",
                 f"{timed(lambda: score(tower, '3', timeout_s=0.5), 1) * 1e3:.1f}"))
    from archer.rewards import ExactMatchReward

    with RewardRunner(ExactMatchReward(), num_workers=2) as runner:
        batch = (["x"] * 256, [{"answer": "x"}] * 256)
        runner.score(*batch)
        per_batch = timed(lambda: runner.score(*batch), 10)
    rows.append(("RewardRunner overhead, 256 exact-match items, ms/batch", f"{per_batch * 1e3:.1f}"))

    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"| {name:<{width}} | {value:>8} |" for name, value in rows)
    header = f"| {'measure':<{width}} | {'value':>8} |\n|{'-' * (width + 2)}|{'-' * 10}|"
    print(header + "\n" + table)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a") as f:
        f.write(
            f"\n## Rewards ({datetime.date.today()})\n\nMachine: {os.cpu_count()} CPU cores ("
            f"load average {os.getloadavg()[0]:.1f} at the end).\nCommand: `python benchmarks/bench_rewards.py`\n\n"
            f"{header}\n{table}\n"
        )


if __name__ == "__main__":
    main()
