"""Random sequences of everything that can happen, fed to the pure core; after every step the
invariants of scripted.check hold, and every request is exactly one of: waiting for its model,
served, or told why not. At least 2,000 random steps in each run."""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gguf_router.policy import DeviceLimit
from gguf_router.scheduling import effects as fx
from gguf_router.scheduling import inputs as ev
from gguf_router.scheduling.records import HOLDS_SLOT, Phase, Why

from scripted import Script, spec

P = Phase
MODELS = ("a", "b", "c", "d")
SIZES = {"a": 100, "b": 300, "c": 500, "d": 100}
# With devices: a and d on gpu0 only, b on either, c on rpc (one model at a time) only.
PLACES = {"a": {"gpu0": 200 << 20}, "b": {"gpu0": 300 << 20, "rpc": 300 << 20}, "c": {"rpc": 400 << 20},
          "d": {"gpu0": 100 << 20}}
DEVICES = {"gpu0": DeviceLimit(500 << 20), "rpc": DeviceLimit(600 << 20, exclusive=True)}
model = st.sampled_from(MODELS)


class Fleet(RuleBasedStateMachine):
    @initialize(models_max=st.integers(0, 3), budget=st.sampled_from([None, 700, 1000]),
                queue_max=st.sampled_from([3, 256]), pinned=st.booleans(), devices=st.booleans())
    def start(self, models_max, budget, queue_max, pinned, devices):
        self.places = PLACES if devices else {}
        specs = [spec(m, SIZES[m], pinned=pinned and m == "d", ttl=20.0 if m == "c" else 0.0,
                      places=self.places.get(m, {})) for m in MODELS]
        self.s = Script(*specs, models_max=models_max, budget_mib=budget, queue_max=queue_max,
                        devices=DEVICES if devices else None)
        self.waiting: dict[int, str] = {}  # tickets waiting, and for which model
        self.served: list[str] = []  # a model per request in flight
        self.versions = dict.fromkeys(MODELS, 1)
        self.gone: set[str] = set()

    def send(self, event, after: float = 0.0) -> None:
        self.s(event, after)
        for effect in self.s.effects:
            assert not (isinstance(effect, fx.Start) and effect.model in self.gone), "a removed model started"
            if isinstance(effect, fx.Admit):
                self.served.append(self.waiting.pop(effect.ticket))
            elif isinstance(effect, fx.Refuse) and effect.ticket is not None:
                self.waiting.pop(effect.ticket, None)

    def phase(self, model_id: str) -> Phase | None:
        record = self.s.fleet.models.get(model_id)
        return record.phase if record else None

    @rule(model_id=model, autoload=st.booleans(), after=st.sampled_from([0.0, 0.5, 3.0]))
    def arrive(self, model_id, autoload, after):
        ticket = next(self.s._tickets)
        self.waiting[ticket] = model_id
        self.send(ev.Arrive(ticket, model_id, autoload), after)
        if self.phase(model_id) is None or model_id in self.gone:
            assert ticket not in self.waiting

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), timed_out=st.booleans())
    def leave(self, data, timed_out):
        ticket = data.draw(st.sampled_from(sorted(self.waiting)))
        model_id = self.waiting.pop(ticket)
        self.send(ev.Leave(ticket, model_id, Why.QUEUE_TIMEOUT if timed_out else None))

    @precondition(lambda self: self.served)
    @rule(data=st.data(), after=st.sampled_from([0.0, 1.0]))
    def release(self, data, after):
        model_id = self.served.pop(data.draw(st.integers(0, len(self.served) - 1)))
        self.send(ev.Release(model_id), after)

    @rule(model_id=model)
    def load(self, model_id):
        if self.phase(model_id) is not None:
            self.send(ev.Load(model_id))

    @rule(model_id=model)
    def unload(self, model_id):
        if self.phase(model_id) is not None:
            self.send(ev.Unload(model_id))

    @rule(model_id=model, took=st.sampled_from([0.2, 4.0]))
    def ready(self, model_id, took):
        if self.phase(model_id) in (P.LOADING, P.UNLOADING):
            self.send(ev.Ready(model_id, self.s.generation(model_id), 1, {}, took))

    @rule(model_id=model, oom=st.booleans())
    def launch_fails(self, model_id, oom):
        if self.phase(model_id) is P.LOADING:
            self.send(ev.LaunchFailed(model_id, self.s.generation(model_id), "no", 1,
                                      "killed: out of memory" if oom else None, 10 << 20))

    @rule(model_id=model, code=st.sampled_from([0, -9]), oom=st.booleans(), stale=st.booleans())
    def exits(self, model_id, code, oom, stale):
        if self.phase(model_id) in HOLDS_SLOT:
            generation = self.s.generation(model_id) - stale  # an input about an earlier child is ignored
            self.send(ev.Exited(model_id, generation, code, "killed: out of memory" if oom else None, 200 << 20))

    @rule(model_id=model)
    def hangs(self, model_id):
        if self.phase(model_id) in (P.LOADED, P.DRAINING):
            self.send(ev.Hung(model_id, self.s.generation(model_id), "unresponsive"))

    @rule(model_id=model, after=st.sampled_from([0.5, 2.0, 30.0]))
    def backoff_over(self, model_id, after):
        self.send(ev.BackoffOver(model_id), after)

    @rule(after=st.sampled_from([1.0, 5.0, 25.0]))
    def tick(self, after):
        self.send(ev.Tick(), after)

    @rule(model_id=model, change=st.sampled_from(["options", "remove", "back"]))
    def configure(self, model_id, change):
        if change == "options":
            self.versions[model_id] += 1
        elif change == "remove":
            self.gone.add(model_id)
        else:
            self.gone.discard(model_id)
        specs = {m: spec(m, SIZES[m], self.versions[m], places=self.places.get(m, {})) for m in MODELS
                 if m not in self.gone}
        self.send(ev.Configure(specs, self.s.limits, self.s.queue_max))

    @invariant()
    def every_request_is_waiting_served_or_told(self):
        if not hasattr(self, "s"):
            return
        waiting = {t: r.id for r in self.s.fleet.models.values() for t, _ in r.tickets}
        assert waiting == self.waiting
        in_flight = {r.id: r.in_flight for r in self.s.fleet.models.values() if r.in_flight}
        assert in_flight == {m: self.served.count(m) for m in set(self.served)}


Fleet.TestCase.settings = settings(max_examples=70, stateful_step_count=60, deadline=None)
test_fleet = Fleet.TestCase
