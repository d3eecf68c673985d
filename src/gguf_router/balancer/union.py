"""What the balancer knows, from what each host lists: which hosts to try for each model, in
order, and one combined model list. Pure functions over the hosts' `/models` entries."""

from __future__ import annotations

from dataclasses import dataclass, field

# A host where the model is already loaded answers at once; one loading it answers soonest
# after that; anywhere else is a cold start; a model that failed there goes last.
_RANK = {"loaded": 0, "loading": 1}
_COLD, _FAILED = 2, 3


@dataclass
class HostModels:
    name: str
    entries: list[dict] = field(default_factory=list)  # the host's last /models "data"
    reachable: bool = False  # its event stream is open and its list current

    def loaded(self) -> int:
        return sum(1 for e in self.entries if _state(e) == "loaded")


def _state(entry: dict) -> str:
    return (entry.get("status") or {}).get("value", "")


def _rank(entry: dict) -> int:
    status = entry.get("status") or {}
    if status.get("failed"):
        return _FAILED
    return _RANK.get(status.get("value", ""), _COLD)


def _usable_key(key: object) -> bool:
    # HAProxy's map file and runtime API split lines on whitespace.
    return isinstance(key, str) and bool(key) and not any(c.isspace() or ord(c) < 32 for c in key)


def candidates(hosts: list[HostModels]) -> dict[str, list[tuple[HostModels, dict]]]:
    """Every model id and alias -> the hosts that have it, best first: hosts the balancer can reach,
    then by the model's state there, then the host with fewer models loaded, then config order."""
    found: dict[str, list[tuple[tuple, HostModels, dict]]] = {}
    for order, host in enumerate(hosts):
        load = host.loaded()
        for entry in host.entries:
            for key in {entry.get("id"), *(entry.get("aliases") or ())}:
                if _usable_key(key):
                    found.setdefault(key, []).append(((not host.reachable, _rank(entry), load, order), host, entry))
    return {key: [(host, entry) for _, host, entry in sorted(found[key], key=lambda t: t[0])] for key in found}


def route_map(hosts: list[HostModels]) -> dict[str, str]:
    """HAProxy's map: key -> ":first:second:" (host names, best first). Unreachable hosts stay in,
    last: HAProxy's own health checks say whether they are up, and a model only they have then
    gets a clear 503 instead of "not found"."""
    return {key: ":" + ":".join(host.name for host, _ in found) + ":" for key, found in candidates(hosts).items()}


def listing(hosts: list[HostModels]) -> list[dict]:
    """Each model once (by id), as its best host lists it, plus `hosts`: every reachable host that
    has it and its state there. Models no reachable host has are left out."""
    models = []
    for key, found in sorted(candidates(hosts).items()):
        found = [(host, entry) for host, entry in found if host.reachable and entry.get("id") == key]
        if not found:
            continue
        entry = dict(found[0][1])
        entry["hosts"] = [{"name": host.name, "status": _state(e) or "unknown"} for host, e in found]
        models.append(entry)
    return models
