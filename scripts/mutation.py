"""Mutation testing of dca's engine (masks, model, coprocessor) with a small `ast` mutator of our own.

mutmut 3 rewrites functions into trampolines inside a `mutants/` copy of the project, which does not suit
a working tree that other people edit at the same time; this script never touches the working tree. It
extracts the committed tree (`git archive HEAD`: src, tests, pyproject.toml, plus any `--extra` files from
the working tree) into a scratch folder, writes one mutant at a time into that copy, and runs a test
selection against it in a process forked from a parent that has already imported torch and transformers
(so a mutant costs its tests, not the imports). A mutant is *killed* when a test fails, or when its tests use
more CPU time than 3x the unmutated tests' (CPU time, not wall time: a shared machine's load must not kill one).

    OMP_NUM_THREADS=1 python scripts/mutation.py list
    OMP_NUM_THREADS=1 python scripts/mutation.py run --label before --sample 240 --tests tests/test_masks.py ...
    OMP_NUM_THREADS=1 python scripts/mutation.py run --label after --only-survivors-of before --tests ...

Operators: arithmetic and comparison operators swapped, and/or swapped, `not`/unary minus removed, integer
and float constants + 1, booleans flipped, strings changed, a keyword argument dropped, a call statement
removed. The target (issue 11, item 5) leaves out exactly two kinds, counted apart by `category`: mutants that
can only change message text (anything inside a `raise`; the `what` argument of dca.inputs' checks) and
device/dtype arguments that make no difference on a CPU in float32 (`device=`/`devices=` dropped, `dtype=`
dropped unless it names another dtype than float32, the arguments of `.to()`, a lone `x.to(...)` statement).
Every other mutant is "logic", equivalent or not. Results go to results/mutation/<label>.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mutation_points import Mutator

REPO = Path(__file__).resolve().parents[1]
MODULES = ("masks.py", "model.py", "coprocessor.py")
OUT = REPO / "results" / "mutation"
SCRATCH = Path(os.environ.get("DCA_MUTATION_SCRATCH", "/tmp/dca-mutation"))


@dataclass
class Mutant:
    id: str  # module:index
    module: str
    index: int
    line: int
    operator: str
    before: str
    after: str
    category: str  # "logic", "message" or "device_dtype"
    status: str = "not run"  # killed, survived, timeout (by --tests)
    status_after: str = ""  # by --then-tests, for the survivors of --tests (killed by --tests: left empty)
    seconds: float = 0.0
    killed_by: str = ""


def _module_source(module: str) -> str:
    return (SCRATCH / "base" / "src" / "dca" / module).read_text()


def enumerate_mutants(module: str) -> list[Mutant]:
    source = _module_source(module)
    lister = Mutator()
    lister.visit(ast.parse(source))
    mutants = []
    for index, node, operator, category in lister.points:
        before = (ast.get_source_segment(source, node) or ast.unparse(node)) if hasattr(node, "lineno") else ""
        mutants.append(Mutant(f"{module}:{index}", module, index, getattr(node, "lineno", 0), operator,
                              before[:120], "", category))
    return mutants


def mutated_source(module: str, index: int) -> str:
    tree = Mutator(target=index).visit(ast.parse(_module_source(module)))
    return ast.unparse(ast.fix_missing_locations(tree))


def _snapshot(extra: list[str], revision: str = "HEAD") -> str:
    """The committed tree (and `extra` working-tree files) in SCRATCH/base; returns the commit."""
    base = SCRATCH / "base"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", revision], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "src", "tests", "pyproject.toml"], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    for path in extra:
        (base / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, base / path)
    return commit


def _prepare_tree(job: int) -> Path:
    tree = SCRATCH / f"run{job}"
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(SCRATCH / "base", tree)
    return tree


def _start_tests(tree: Path, tests: list[str], log: Path) -> int:
    """Fork a child that imports dca from `tree` and runs pytest on `tests`; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: a fresh dca from the mutant tree
        try:
            sys.path.insert(0, str(tree / "src"))
            os.chdir(tree)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            code = pytest.main(["-x", "-q", "-rf", "-p", "no:cacheprovider", "-W", "ignore", *tests])
        except BaseException:  # noqa: BLE001 -- a mutant that breaks the import is killed
            code = 3
        os._exit(int(code))
    return pid


def _outcome(code: int, log: Path, tests: list[str]) -> tuple[str, str]:
    """(status, first failing test) of a finished child."""
    failed = ""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            failed = line.split(" - ")[0].split(" ", 1)[1]
            break
    if code == 0:
        return "survived", ""
    if code == 5:  # no tests collected: the selection is wrong, not the mutant killed
        raise SystemExit(f"pytest collected no tests from {tests}")
    return "killed", failed


def _run_tests(tree: Path, tests: list[str], log: Path) -> tuple[str, float, str]:
    """(status, CPU seconds, first failing test) of the tests run to the end."""
    _, status, usage = os.wait4(_start_tests(tree, tests, log), 0)
    state, failed = _outcome(os.waitstatus_to_exitcode(status), log, tests)
    return state, usage.ru_utime + usage.ru_stime, failed


def _cpu_seconds(pid: int) -> float:
    """CPU time a running child has used: timeouts count it, not the wall clock, which other work on a shared
    machine stretches (a survivor stopped by a wall-clock limit would be counted as killed)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _write_file():
    """dca.atomic.write_file, loaded on its own: importing the `dca` package would register its attention
    with transformers in the parent, and every child's fresh import would then be refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dca_atomic", REPO / "src" / "dca" / "atomic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_file


def changed_lines(module: str, since: str, commit: str) -> set[int]:
    """Lines of src/dca/<module> at `commit` that were added or changed after `since` (all, for a new file)."""
    diff = subprocess.run(["git", "diff", "-U0", since, commit, "--", f"src/dca/{module}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    lines: set[int] = set()
    for hunk in (line for line in diff.splitlines() if line.startswith("@@")):
        start, _, count = hunk.split()[2][1:].partition(",")
        lines.update(range(int(start), int(start) + int(count or 1)))
    return lines


def run(args: argparse.Namespace) -> None:
    write_file = _write_file()
    import peft  # noqa: F401 -- imported once here, inherited by every forked child
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    commit = _snapshot(args.extra, args.commit)
    mutants = [m for module in args.modules for m in enumerate_mutants(module)]
    if args.changed_since:  # only the code written since: a mutant whose line is new or edited
        changed = {module: changed_lines(module, args.changed_since, commit) for module in args.modules}
        mutants = [m for m in mutants if m.line in changed[m.module]]
    if args.only_survivors_of:
        previous = json.loads((OUT / f"{args.only_survivors_of}.json").read_text())
        def survived(m):
            return m["status"] == "survived" and m.get("status_after", "") in ("survived", "")
        # a survivor is the one mutant here of its module, line, operator and code, or the one --map names (-: gone)
        by_id, moved = {m.id: m for m in mutants}, dict(pair.split("=") for pair in args.map)

        def key(m):
            return m["module"], m["line"], m["operator"], m["before"]
        chosen, removed = [], []
        for old in (m for m in previous["mutants"] if survived(m)):
            if moved.get(old["id"]) == "-":
                removed.append({**old, "status": "removed"})
                continue
            same = [m for m in mutants if (m.module, m.line, m.operator, m.before) == key(old)]
            here = by_id.get(moved[old["id"]]) if old["id"] in moved else same[0] if len(same) == 1 else None
            if here is None or key(asdict(here)) != key(old):
                raise SystemExit(f"survivor {old['id']} (line {old['line']}, {old['operator']}) is not one mutant "
                                 f"here: --map it")
            chosen.append(here)
        killed_before = previous["carried_over"] + [m for m in previous["mutants"] if not survived(m)] + removed
        mutants = chosen
    else:
        killed_before = []
        if args.sample:  # in random order: a run stopped early is still a uniform sample
            mutants = random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
    previous_rows = []
    if args.resume and (OUT / f"{args.label}.json").is_file():  # keep what an earlier, stopped run finished
        previous_rows = json.loads((OUT / f"{args.label}.json").read_text())["mutants"]
        finished = {m["id"] for m in previous_rows}
        mutants = [m for m in mutants if m.id not in finished]
    skipped = [m for m in mutants if m.category in args.skip_categories]
    mutants = [m for m in mutants if m.category not in args.skip_categories]
    trees = [_prepare_tree(job) for job in range(args.jobs)]
    logs = SCRATCH / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status, baseline, failed = _run_tests(trees[0], args.tests, logs / "baseline.log")
    if status != "survived":
        raise SystemExit(f"the unmutated code fails its tests ({failed}); see {logs / 'baseline.log'}")
    print(f"baseline: {baseline:.0f} CPU s; {len(mutants)} mutants, {args.jobs} at a time", flush=True)
    timeout = max(3 * baseline, baseline + 60)  # CPU seconds
    result = {"command": "python scripts/mutation.py " + " ".join(sys.argv[1:]), "commit": commit,
              "tests": args.tests, "baseline_seconds": baseline, "timeout_seconds": timeout,
              "extra_files": args.extra, "sample_seed": args.seed, "modules": list(args.modules),
              "changed_since": args.changed_since, "carried_over": killed_before,
              "mutants": previous_rows,
              "skipped_categories": args.skip_categories, "skipped": [asdict(m) for m in skipped]}
    # a survivor of --tests goes straight on to --then-tests (which should list its new tests first)
    pending, running, done = [(m, 1) for m in mutants], {}, 0  # running: pid -> (mutant, stage, job, started, log)
    while pending or running:
        free = [job for job in range(args.jobs) if job not in {r[2] for r in running.values()}]
        while pending and free:
            (mutant, stage), job = pending.pop(0), free.pop(0)
            (trees[job] / "src" / "dca" / mutant.module).write_text(mutated_source(mutant.module, mutant.index))
            log = logs / f"{mutant.id.replace(':', '_').replace('/', '_')}-{stage}.log"
            tests = args.tests if stage == 1 else args.then_tests
            running[_start_tests(trees[job], tests, log)] = (mutant, stage, job, time.time(), log)
        time.sleep(0.2)
        for pid, (mutant, stage, job, started, log) in list(running.items()):
            finished, status = os.waitpid(pid, os.WNOHANG)
            if not finished and _cpu_seconds(pid) < timeout * (1 if stage == 1 else 2):
                continue
            if not finished:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                state, killed_by = "timeout", ""
            else:
                tests = args.tests if stage == 1 else args.then_tests
                state, killed_by = _outcome(os.waitstatus_to_exitcode(status), log, tests)
            del running[pid]
            original = SCRATCH / "base" / "src" / "dca" / mutant.module
            shutil.copyfile(original, trees[job] / "src" / "dca" / mutant.module)
            if stage == 1:
                mutant.status, mutant.killed_by, mutant.seconds = state, killed_by, time.time() - started
                if state == "survived" and args.then_tests:
                    pending.insert(0, (mutant, 2))
                    continue
            else:
                mutant.status_after, mutant.killed_by = state, killed_by or mutant.killed_by
            done += 1
            result["mutants"].append(asdict(mutant))
            print(f"[{done}/{len(mutants)}] {mutant.id} line {mutant.line} {mutant.operator} ({mutant.category}): "
                  f"{mutant.status} {mutant.status_after} {mutant.seconds:.0f}s {mutant.killed_by}", flush=True)
            result["summary"] = summarise(result)
            write_file(OUT / f"{args.label}.json", json.dumps(result, indent=2))
    print(json.dumps(result.get("summary", {}), indent=2))


def summarise(result: dict) -> dict:
    """Scores by module: with --tests alone ("before") and with --then-tests too ("after"); "logic" leaves out
    the mutants that can only change message text or device/dtype arguments."""
    rows = [m for m in result["mutants"] + result["carried_over"] if m["status"] != "removed"]
    summary = {"removed_from_the_source": sum(m["status"] == "removed" for m in result["carried_over"])}

    def before(m):
        return m["status"] != "survived"

    def after(m):
        return before(m) or m.get("status_after") not in ("survived", "")

    for scope in (*result.get("modules", MODULES), "all"):
        chosen = [m for m in rows if scope in ("all", m["module"])]
        logic = [m for m in chosen if m["category"] == "logic"]
        entry = {"mutants": len(chosen), "logic_mutants": len(logic)}
        for when, killed in (("before", before), ("after", after)):
            entry[f"score_{when}"] = round(100 * sum(map(killed, chosen)) / max(len(chosen), 1), 1)
            entry[f"score_logic_{when}"] = round(100 * sum(map(killed, logic)) / max(len(logic), 1), 1)
        summary[scope] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list")
    runner = sub.add_parser("run")
    for command in (lister, runner):
        command.add_argument("--modules", nargs="+", default=list(MODULES), help="files under src/dca to mutate")
    runner.add_argument("--label", required=True)
    runner.add_argument("--tests", nargs="+", required=True)
    runner.add_argument("--sample", type=int, default=0, help="run a seeded random sample of this many mutants")
    runner.add_argument("--seed", type=int, default=0)
    runner.add_argument("--then-tests", nargs="*", default=[], help="a second selection run on the survivors "
                        "of --tests (the score after new tests)")
    runner.add_argument("--resume", action="store_true", help="keep the mutants an earlier run of --label finished")
    runner.add_argument("--skip-categories", nargs="*", default=[], choices=["message", "device_dtype"],
                        help="do not run mutants of these categories (they do not count towards the target)")
    runner.add_argument("--jobs", type=int, default=1, help="mutants tested at once (each a forked process)")
    runner.add_argument("--commit", default="HEAD", help="the committed tree to mutate and test")
    runner.add_argument("--extra", nargs="*", default=[], help="working-tree files added to the committed tree")
    runner.add_argument("--changed-since", default=None, help="only mutants on lines added or changed after this "
                        "revision (code written since an earlier run)")
    runner.add_argument("--only-survivors-of", default=None, help="rerun only the survivors of an earlier label")
    runner.add_argument("--map", nargs="*", default=[], help="OLD=NEW: a survivor's id at --commit where its "
                        "module, line, operator and code do not find it; OLD=- where an edit removed it (it then "
                        "counts nowhere)")
    args = parser.parse_args()
    if args.command == "list":
        _snapshot([])
        for module in args.modules:
            mutants = enumerate_mutants(module)
            by_category = {c: sum(m.category == c for m in mutants) for c in ("logic", "message", "device_dtype")}
            print(module, len(mutants), by_category)
        return
    run(args)


if __name__ == "__main__":
    main()
