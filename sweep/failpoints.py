"""Named pause points that let the chaos tests SIGKILL a driver or worker at an exact moment.

`BDSWEEP_FAILPOINTS="planning=/tmp/a,compaction=/tmp/b"` makes the first process that reaches
`failpoint("planning")` create /tmp/a holding its pid, then stop there until it is killed. Each
point fires once (the flag file is created exclusively), so a retried worker passes through. With
the variable unset (always, outside tests) a failpoint is one dictionary lookup.

Points: planning (the driver, after resume planning, before Ray), cell_recorded (the driver,
after a finished cell's one-row Parquet file, before its MLflow run), mlflow_logging (the
driver, a child run created but not yet logged), compaction (the driver, the merged part written,
its inputs not yet deleted), attack_training (a worker, mid-way through training an attack).
"""
from __future__ import annotations

import os
import time

ENV = "BDSWEEP_FAILPOINTS"


def armed() -> str | None:
    """The failpoint spec of this process (passed on to Ray workers, which do not inherit it)."""
    return os.environ.get(ENV) or None


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        key, _, flag = item.partition("=")
        if key.strip() != name or not flag:
            continue
        try:
            fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return  # fired already: a retry runs through
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        while True:  # until the test kills this process
            time.sleep(0.5)
