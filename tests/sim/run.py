"""``scripts/sim``: run many seeded simulation schedules and report failures and speed.

Owns: the command line (``--schedules N --seed S --nodes K --steps L --jobs J``, and
``--membership [--changes-only]``), the loop over seeds ``S, S+1, ...`` (split into J
disjoint ranges, one process each, when J > 1), and the report: schedules run, failures
(each with its seed, its schedule and a one-line replay command) and schedules per minute
of wall time. Exit status 1 when any schedule broke an invariant.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from tests.sim.engine import run_schedule_sync
from tests.sim.node_parts import template
from tests.sim.schedule import SPARES, random_schedule

THREADED_EVERY = 10  # every 10th seed runs the service's blocking work in threads


@dataclass
class Summary:
    """What a batch of schedules came to."""

    schedules: int = 0
    failures: list[tuple[int, list[str]]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def per_minute(self) -> float:
        """Schedules per minute of wall time."""
        return 60.0 * self.schedules / self.seconds if self.seconds else 0.0


def changing_seeds(schedules: int, seed: int, nodes: int, length: int = 24) -> list[int]:
    """The seeds among ``seed .. seed + schedules - 1`` whose membership schedule changes
    the membership (what ``run_many(..., changes_only=True)`` runs)."""
    return [
        current
        for current in range(seed, seed + schedules)
        if random_schedule(
            current, nodes, length=length, threaded_every=THREADED_EVERY, spares=SPARES
        ).changes
    ]


def replay_command(seed: int, nodes: int, membership: bool = False) -> str:
    """The one-line command that runs exactly one schedule again."""
    flag = " --membership" if membership else ""
    return f"scripts/sim --seed {seed} --schedules 1 --nodes {nodes}{flag}"


def run_many(
    schedules: int,
    seed: int,
    nodes: int,
    *,
    length: int = 24,
    out: TextIO | None = None,
    membership: bool = False,
    changes_only: bool = False,
) -> Summary:
    """Run the schedules of seeds ``seed .. seed + schedules - 1``; print each failure as
    it happens.

    ``membership``: mix membership changes (join, decommission, forget) into about one
    schedule in four (spare nodes); off by default (see docs/simulation.md).
    ``changes_only`` (with ``membership``): run only those seeds' schedules that change
    the membership (the others are the plain random schedules); ``Summary.schedules``
    counts the schedules run."""
    if changes_only and not membership:
        raise ValueError("changes_only needs membership")
    stream = out or sys.stdout
    spares = SPARES if membership else 0
    template(nodes, spares)  # built once, outside the timing
    summary = Summary()
    start = time.perf_counter()
    for current in range(seed, seed + schedules):
        schedule = random_schedule(
            current, nodes, length=length, threaded_every=THREADED_EVERY, spares=spares
        )
        if changes_only and not schedule.changes:
            continue
        try:
            problems = run_schedule_sync(schedule)
        except Exception as exc:  # the engine itself broke: still a failing seed to replay
            problems = [f"the simulation raised {type(exc).__name__}: {exc}"]
        summary.schedules += 1
        if problems:
            summary.failures.append((current, problems))
            print(f"FAIL seed={current}", file=stream)
            for problem in problems:
                print(f"  {problem}", file=stream)
            print(schedule.describe(), file=stream)
            print(f"  replay: {replay_command(current, nodes, membership)}", file=stream)
    summary.seconds = time.perf_counter() - start
    return summary


def run_jobs(
    schedules: int,
    seed: int,
    nodes: int,
    length: int,
    jobs: int,
    *,
    membership: bool = False,
    changes_only: bool = False,
) -> Summary:
    """Run the seeds in ``jobs`` processes on disjoint ranges; their output passes through."""
    share, extra = divmod(schedules, jobs)
    ranges, start = [], seed
    for job in range(jobs):
        count = share + (1 if job < extra else 0)
        if count:
            ranges.append((start, count))
        start += count
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    began = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.sim.run",
                "--seed",
                str(first),
                "--schedules",
                str(count),
                "--nodes",
                str(nodes),
                "--steps",
                str(length),
                *(["--membership"] if membership else []),
                *(["--changes-only"] if changes_only else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for first, count in ranges
    ]
    summary = Summary()
    for proc in procs:
        output = proc.communicate()[0]
        sys.stdout.write(output)  # its failures (schedule, replay command) and its total
        done = re.search(r"^(\d+) schedules", output, re.MULTILINE)
        summary.schedules += int(done.group(1)) if done else 0
        for failed in re.findall(r"failed seed=(\d+)", output):
            summary.failures.append((int(failed), ["see its output above"]))
        if proc.returncode and not done:
            summary.failures.append((-1, [f"a job exited with status {proc.returncode}"]))
    summary.seconds = time.perf_counter() - began
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/sim``."""
    parser = argparse.ArgumentParser(prog="scripts/sim", description=__doc__)
    parser.add_argument("--schedules", type=int, default=100, help="how many (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size, >= 3 (default 3)")
    parser.add_argument("--steps", type=int, default=24, help="steps per schedule (default 24)")
    parser.add_argument("--jobs", type=int, default=1, help="processes, one per core (default 1)")
    parser.add_argument(
        "--membership", action="store_true",
        help="mix membership changes (join, decommission, forget) into the schedules",
    )  # fmt: skip
    parser.add_argument(
        "--changes-only", action="store_true",
        help="with --membership: of the seeds, run only the schedules that change membership",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.schedules < 1 or args.nodes < 3 or args.steps < 1 or args.jobs < 1:
        parser.error("--schedules, --steps and --jobs must be >= 1 and --nodes >= 3")
    if args.changes_only and not args.membership:
        parser.error("--changes-only needs --membership")
    logging.disable(logging.CRITICAL)  # nodes log expected faults; invariants decide
    try:
        if args.jobs > 1:
            summary = run_jobs(
                args.schedules, args.seed, args.nodes, args.steps, args.jobs,
                membership=args.membership, changes_only=args.changes_only,
            )  # fmt: skip
        else:
            summary = run_many(
                args.schedules, args.seed, args.nodes, length=args.steps,
                membership=args.membership, changes_only=args.changes_only,
            )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)  # main() also runs inside pytest (tests/sim/test_run.py)
    print(
        f"{summary.schedules} schedules ({args.nodes} nodes, seeds {args.seed}.."
        f"{args.seed + args.schedules - 1}), {len(summary.failures)} failed, "
        f"{summary.seconds:.1f} s, {summary.per_minute:.0f} schedules/minute"
    )
    for seed, _ in summary.failures:
        print(f"  failed seed={seed}: {replay_command(seed, args.nodes, args.membership)}")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
