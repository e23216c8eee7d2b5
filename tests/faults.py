"""Fault injection for saves: every filesystem operation of `dca.atomic` can be made the last one.

`kill_at(monkeypatch, n)` makes the n-th operation after arming raise `Killed`, and every operation
after it too, so nothing a `finally` or `except` tries afterwards reaches the disk: what is left is
exactly what a kill -9 at that instant leaves.
"""

from __future__ import annotations

import re

from dca import atomic

OPERATIONS = ("_make_dir", "_write_file", "_copy", "_sync_dir", "_rename", "_remove_tree")


class Killed(BaseException):  # noqa: N818 -- not an error: the process "dies" here
    pass


class FaultInjector:
    def __init__(self, monkeypatch, kill_at: int | None = None):
        self.kill_at, self.armed, self.dead, self.log = kill_at, False, False, []
        for name in OPERATIONS:
            monkeypatch.setattr(atomic, name, self._wrap(name, getattr(atomic, name)))

    def _wrap(self, name, real):
        def operation(*args):
            if self.dead:
                raise Killed
            if self.armed:
                # (operation, file names): staging names lose their random part, so two runs compare
                self.log.append((name, *[re.sub(r"tmp-[0-9a-f]+", "tmp-*", str(getattr(a, "name", a)))
                                         for a in args if not isinstance(a, bytes)]))
                if len(self.log) == self.kill_at:
                    self.dead = True
                    raise Killed
            return real(*args)

        return operation
