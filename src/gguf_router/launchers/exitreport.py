"""Run by systemd as a model unit's ExecStopPost: records how the unit's main process ended.

systemd hands ExecStopPost the result in SERVICE_RESULT / EXIT_CODE / EXIT_STATUS, and the
command still runs inside the unit's cgroup, so it can also read the kernel's OOM-kill counter
there. On cgroup v2 systemd reports an OOM kill itself (SERVICE_RESULT=oom-kill); on cgroup v1
it says only "signal", and this counter is the one place the truth is left. The router reads
the JSON file once the unit's main process is gone.
"""

from __future__ import annotations

import json
import os
import sys


def oom_kills(unit: str) -> int:
    """OOM kills in this unit's own memory cgroup (0 if it has none of its own)."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return 0
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            counters = f"/sys/fs/cgroup/memory{path}/memory.oom_control"  # cgroup v1
        elif number == "0" and len(lines) == 1:
            counters = f"/sys/fs/cgroup{path}/memory.events"  # pure cgroup v2
        else:
            continue
        if not path.endswith("/" + unit):
            return 0  # a shared cgroup (a v1 user manager): its counter is not this unit's
        try:
            for entry in open(counters).read().splitlines():
                key, _, value = entry.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            return 0
    return 0


def main(path: str, unit: str) -> None:
    env = os.environ
    report = {"result": env.get("SERVICE_RESULT", ""), "code": env.get("EXIT_CODE", ""),
              "status": env.get("EXIT_STATUS", ""), "oom_kills": oom_kills(unit)}
    with open(path + ".tmp", "w") as out:
        json.dump(report, out)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
