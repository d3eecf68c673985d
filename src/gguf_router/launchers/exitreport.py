"""Run by systemd as a model unit's ExecStopPost: records how the unit's main process ended.

systemd hands ExecStopPost the result in SERVICE_RESULT / EXIT_CODE / EXIT_STATUS, and the
command still runs inside the unit's cgroup, so it can also read the kernel's OOM-kill counter
there. On cgroup v2 systemd reports an OOM kill itself (SERVICE_RESULT=oom-kill); on cgroup v1
it says only "signal", and this counter is the one place the truth is left. The cgroup's peak
and limit are recorded too: once the unit is collected they are gone, and an out-of-memory
report names both. The router reads the JSON file once the unit's main process is gone.
"""

from __future__ import annotations

import json
import os
import sys

from .cgroup import UnitMemory


def main(path: str, unit: str) -> None:
    env = os.environ
    memory = UnitMemory.find("self", unit)
    use = memory.use() if memory else None
    report = {"result": env.get("SERVICE_RESULT", ""), "code": env.get("EXIT_CODE", ""),
              "status": env.get("EXIT_STATUS", ""), "oom_kills": memory.oom_kills() if memory else 0,
              "peak": use.peak if use else None, "limit": use.limit if use else None}
    with open(path + ".tmp", "w") as out:
        json.dump(report, out)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
