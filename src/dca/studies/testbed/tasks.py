"""Synthetic tasks that need serial computation, generated from a seed with disjoint train and test sets.

Every prompt of a task has the same length, and every answer too, so batches need no padding (the
scratchpad's worked steps vary in length and are right-padded by `models.py`).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from dca.checks import check_choice, check_int

STATEMENTS = 8  # assignments per pointer-chasing question
MAX_HOPS = 4
VARIABLES = string.ascii_lowercase[:12]  # few enough that every assignment token is seen often
DIGITS = 4  # per addend
STEP_END = ">"  # ends the worked steps of a scratchpad
CHANCE = {"chase": 1 / 3}  # one of the three chain ends, guessed


@dataclass(frozen=True)
class Example:
    """One question: the prompt, its answer, the worked steps before it, and how hard it is."""

    prompt: str
    answer: str
    steps: str  # scratchpad: worked steps, written before STEP_END and the answer
    difficulty: int  # chase: hops; add: the longest run of carries

    @property
    def worked(self) -> str:
        """What the scratchpad variant writes after the prompt."""
        return self.steps + STEP_END + self.answer


def chase_example(rng: random.Random, hops: int | None = None) -> Example:
    """8 assignments in random order: the queried chain of `hops` hops and two distractor chains."""
    hops = rng.randint(1, MAX_HOPS) if hops is None else hops
    names = rng.sample(VARIABLES, STATEMENTS)
    digits = rng.sample(string.digits, 3)
    rest = STATEMENTS - hops
    first = rng.randint(1, rest - 1)
    lengths, statements = (hops, first, rest - first), []
    start = 0
    for length, digit in zip(lengths, digits, strict=True):
        chain = names[start:start + length]  # chain[0] = digit, chain[i] = chain[i-1]
        start += length
        statements += [(chain[0], digit)] + [(chain[i], chain[i - 1]) for i in range(1, length)]
    rng.shuffle(statements)
    query = names[hops - 1]
    prompt = "".join(f"{left}={right};" for left, right in statements) + f"?{query}:"
    visited = "".join(reversed(names[:hops - 1]))  # the variables passed through, from the query down
    return Example(prompt, digits[0], visited, hops)


def add_example(rng: random.Random) -> Example:
    """a+b with DIGITS-digit addends, the sum zero-padded to DIGITS+1 digits, most significant first."""
    a, b = rng.randrange(10 ** DIGITS), rng.randrange(10 ** DIGITS)
    total = str(a + b).zfill(DIGITS + 1)
    run = longest = carry = 0
    for i in range(DIGITS):  # from the least significant digit
        carry = (a // 10 ** i % 10 + b // 10 ** i % 10 + carry) >= 10
        run = run + 1 if carry else 0
        longest = max(longest, run)
    return Example(f"{a:0{DIGITS}d}+{b:0{DIGITS}d}=", total, total[::-1], longest)


TASKS: dict[str, Callable[[random.Random], Example]] = {"chase": chase_example, "add": add_example}


def units(task: str) -> list[str]:
    """The tokenizer's units for a task: characters, and for ``chase`` each assignment and question as a word."""
    check_choice("task", task, tuple(TASKS))
    if task == "add":
        return list(string.digits + "+=" + STEP_END)
    letters = VARIABLES
    words = [f"{x}={y};" for x in letters for y in letters + string.digits if x != y] + [f"?{x}:" for x in letters]
    return words + list(letters + string.digits + STEP_END)


def make_splits(task: str, seed: int, train: int, test: int) -> tuple[list[Example], list[Example]]:
    """`train` and `test` distinct examples; no test prompt occurs in train. Deterministic per (task, seed)."""
    check_choice("task", task, tuple(TASKS))
    check_int("train", train)
    check_int("test", test)
    generate = TASKS[task]
    rng = random.Random(f"{task}-{seed}")  # string seeds hash deterministically (not with PYTHONHASHSEED)
    seen: set[str] = set()
    splits: list[list[Example]] = [[], []]
    for split, size in zip(splits, (train, test), strict=True):
        tries = 0
        while len(split) < size:
            tries += 1
            if tries > 50 * size:
                raise ValueError(f"task {task!r}: could not draw {size} distinct questions (too few exist)")
            example = generate(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                split.append(example)
    return splits[0], splits[1]
