"""Anytime serving: deadlines that degrade to earlier exits, estimates that recover after
bursts, calibrated policies, and slow uploads that cannot exhaust capacity.

The service-level tests run the real fixture model in ONNX Runtime with every graph
slowed by a fixed sleep (10 ms + 1 ms per item), so that queueing is real and
predictable on any machine; the HTTP tests run a real server on 127.0.0.1.
Assertions are on behaviour (which exit answered, whether a deadline was reported
met, 200 versus 4xx/5xx), with timing margins of several times the stage times.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from serving_model import (
    NUM_EXITS,
    ServerProcess,
    build_model_folder,
    cascade_exit,
    encode,
    policy_score,
    uniform_image,
)

from serving import cascade
from serving.latency import DecayingMean, ServiceTimeModel
from serving.metrics import ServingMetrics
from serving.policy import PolicyParams
from serving.runtime import ModelRuntime, SessionOptions
from serving.service import InferenceService

STAGE_S, PER_ITEM_S = 0.010, 0.001


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- estimates --------------------------------------------------------------------------------


def test_service_time_model_fits_batch_size_and_returns_to_idle_after_a_burst():
    clock = FakeClock()
    model = ServiceTimeModel(clock=clock)  # default half-life: 0.5 s
    model.seed([(1, 0.010), (8, 0.024)] * 5)
    assert model.estimate(1) == pytest.approx(0.010) and model.estimate(8) == pytest.approx(0.024)
    for _ in range(2000):  # a long burst under contention: 4x slower at batch 8
        clock.now += 0.01
        model.observe(8, 0.096)
    assert model.estimate(8) > 0.07
    clock.now += 5.0  # five seconds of silence
    assert model.estimate(8) == pytest.approx(0.024, rel=0.1)
    assert model.estimate(1) == pytest.approx(0.010, rel=0.1)


def test_service_time_model_follows_a_real_change():
    clock = FakeClock()
    model = ServiceTimeModel(half_life_s=1.0, clock=clock)
    model.seed([(1, 0.010)])
    for _ in range(200):  # the machine got slower for good: live data outweighs the prior
        clock.now += 0.01
        model.observe(1, 0.020)
    assert model.estimate(1) == pytest.approx(0.018, rel=0.05)


def test_prediction_gap_fades_without_new_observations():
    clock = FakeClock()
    gap = DecayingMean(clock=clock)
    assert gap.value() == 0.0
    for _ in range(500):
        clock.now += 0.01
        gap.observe(0.050)
    assert gap.value() > 0.04
    clock.now += 5.0
    assert gap.value() < 0.005


# --- the service under load, on a slowed real model --------------------------------------------


class _Underestimate(ServiceTimeModel):
    """A time model that keeps saying a stage takes ``seconds`` (it learns nothing): the stages run
    later than predicted by a known amount, which is what the prediction gap is there to learn."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._seconds = seconds

    def estimate(self, batch: int = 1) -> float:
        return self._seconds

    def observe(self, batch: int, seconds: float) -> None:
        pass


def test_the_prediction_gap_learns_the_whole_lateness_of_stage_predictions(model_dir):
    """Stages take ~11 ms where the time model says 5: the gap must learn ~6 ms. It learned against
    predictions that already included it, and settled at half the lateness (predictions stayed late)."""
    service = _slowed_service(model_dir, probe_interval_s=60.0)
    for worker in service.stage_workers:
        service.service_models[worker.name] = _Underestimate(0.005)

    async def main():
        await service.start()
        try:
            plan = service.plan(PolicyParams(budget_ms=10_000, confidence=(1.0,)))  # stage by stage, every exit
            late = []
            for _ in range(12):
                out = await service.run(_x(service), plan, deadline=time.perf_counter() + 10)
                assert out.exits_evaluated == list(range(1, NUM_EXITS + 1))
                late.append(out.seconds / NUM_EXITS - 0.005)  # per stage, beyond the model's 5 ms
            return sorted(late)[len(late) // 2]
        finally:
            await service.stop()

    lateness = asyncio.run(main())
    assert lateness > 0.004
    assert service.prediction_gap.value() == pytest.approx(lateness, rel=0.25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


def _slowed(run):
    def slow(batch):
        time.sleep(STAGE_S + PER_ITEM_S * len(batch))
        return run(batch)

    return slow


def _slowed_service(model_dir, probe_interval_s: float = 0.2) -> InferenceService:
    runtime = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=1))
    for graph in runtime.graphs:  # batches and lone requests alike
        graph.run = _slowed(graph.run)
        graph.run_alone = _slowed(graph.run_alone)
    svc = InferenceService(
        runtime,
        ServingMetrics(),
        max_batch_size=4,
        max_wait_ms=0,
        estimate_half_life_s=0.5,
        probe_interval_s=probe_interval_s,
    )
    svc.seed_latency(runtime.calibrate(runs=2, batch_sizes=(1, 4)))
    return svc


@pytest.fixture()
def service(model_dir):
    return _slowed_service(model_dir)


def _x(svc):
    return svc.runtime.example_input(1, seed=5)[0]


def test_deadline_answers_from_the_deepest_exit_an_idle_server_can_finish(service):
    async def main():
        await service.start()
        try:
            plan = service.plan(PolicyParams(budget_ms=300))
            assert (plan.mode, plan.exit) == ("cascade", NUM_EXITS)
            # In time from the main exit's own graph: one run instead of a stage per exit, and
            # the main exit's full-path GFLOPs instead of every head's.
            out = await service.run(_x(service), plan, deadline=time.perf_counter() + 0.3)
            assert (out.exit, out.exits_evaluated, out.deadline_met, out.degraded) == (3, [3], True, False)
            assert out.gflops == service.costs.gflops[-1] < service.costs.cascade_gflops[-1]
            # With confidence thresholds the early exits' scores decide: stage by stage.
            plan = service.plan(PolicyParams(budget_ms=300, confidence=(1.0,)))
            out = await service.run(_x(service), plan, deadline=time.perf_counter() + 0.3)
            assert (out.exit, out.exits_evaluated, out.deadline_met) == (3, [1, 2, 3], True)
            # Every graph idles at ~11 ms: 20 ms lets the stages reach exit 1 only (exit 2: ~22 ms), but
            # the main exit's own graph is ready in time — the deepest exit that can be, which an idle
            # server answers (with room for the margin and the one-call spread a busy host teaches).
            plan = service.plan(PolicyParams(budget_ms=20))
            assert (plan.exit, plan.stages_to) == (NUM_EXITS, 1)
            out = await service.run(_x(service), plan, deadline=time.perf_counter() + 0.020)
            assert (out.exit, out.exits_evaluated, out.deadline_met, out.degraded) == (3, [3], True, False)
            # A deadline within the margin one call keeps to spare is not that call's: planned as
            # the stages (answered from them, not "degraded" on an idle server).
            single_ms = service.idle_service_ms()[0]
            budget = max(*single_ms, service.deadline_floor_ms or 0.0) + 0.2  # the margin is 0.5 ms
            fits = [e for e in range(2, NUM_EXITS + 1) if single_ms[e - 1] + 0.5 <= budget]
            tight = service.plan(PolicyParams(budget_ms=budget))
            assert (tight.exit, tight.stages_to) == (max(fits, default=1), 1), (single_ms, budget)
            # A FLOP budget beside a deadline keeps the exit it buys alone (a full path within it), in
            # one call; the deadline used to cap it by the stages' cost, which counts every head.
            costs = service.costs
            budget = costs.gflops[1] + (costs.cascade_gflops[1] - costs.gflops[1]) / 2
            assert service.plan(PolicyParams(budget_gflops=budget)).exit == 2
            plan = service.plan(PolicyParams(budget_gflops=budget, budget_ms=300))
            assert (plan.exit, plan.stages_to) == (2, 1)
            out = await service.run(_x(service), plan, deadline=time.perf_counter() + 0.3)
            assert (out.exit, out.exits_evaluated, out.gflops, out.degraded) == (2, [2], costs.gflops[1], False)
            # Under load the stages can only reach exit 1 within the budget: that answer is degraded.
            outcomes = await asyncio.gather(
                *(service.run(_x(service), plan, deadline=time.perf_counter() + 0.03) for _ in range(12))
            )
            staged = [o for o in outcomes if o.exits_evaluated == [1]]
            assert staged and all(o.degraded for o in staged), [(o.exits_evaluated, o.degraded) for o in outcomes]
            assert all(o.gflops <= budget for o in outcomes)
        finally:
            await service.stop()

    asyncio.run(main())


@pytest.mark.parametrize("together", [4, 16])
def test_requests_together_with_room_to_spare_run_one_graph_each(service, together):
    """Several at once, 300 ms each: the main exit's graph runs them batched (16 in four batches of 4,
    ~56 ms), so each answers from that one graph instead of a stage per exit, all in time. Every other
    request inside ``run`` was counted as one more batch-1 run of the stage chain (15 x 33 ms for 16):
    under steady load a deadline that one graph always met went stage by stage, at half the
    throughput. Counted as batches, the bound for 16 is ~170 ms."""

    async def main():
        await service.start()
        try:
            plan = service.plan(PolicyParams(budget_ms=300))
            outcomes = await asyncio.gather(
                *(service.run(_x(service), plan, deadline=time.perf_counter() + 0.3) for _ in range(together))
            )
            assert [(o.exit, o.exits_evaluated, o.deadline_met) for o in outcomes] == [(3, [3], True)] * together
        finally:
            await service.stop()

    asyncio.run(main())


def test_one_call_needs_room_for_how_far_its_answers_land_from_their_prediction(service):
    """The prediction gap is a mean: one call predicted in time by it alone is late about half the
    time near the deadline, and cannot stop early as the stages can. With one-call answers landing
    ~180 ms either side of their predictions, a 300 ms deadline goes to the stages."""
    plan = service.plan(PolicyParams(budget_ms=300))
    assert service.whole_path_in_time(plan, time.perf_counter() + 0.3) is not None
    for _ in range(8):
        service.one_call_spread.observe(0.2)
    assert service.whole_path_in_time(plan, time.perf_counter() + 0.3) is None


def test_burst_degrades_to_earlier_exits_instead_of_refusing_then_recovers(service):
    async def main():
        await service.start()
        try:
            plan = service.plan(PolicyParams(budget_ms=100))
            assert plan.exit == NUM_EXITS  # what an idle server would answer from
            x = _x(service)
            # 40 at once: stage 1 alone needs 10 batches of 14 ms, so most cannot go deeper in time.
            outcomes = await asyncio.gather(
                *(service.run(x, plan, deadline=time.perf_counter() + 0.1) for _ in range(40))
            )
            exits = [o.exit for o in outcomes]
            assert all(o.deadline_met is not None for o in outcomes)
            assert exits.count(1) >= 20 and any(o.degraded for o in outcomes), exits
            # Those that went deeper were predicted to make it: the predictions are not blind.
            deep = [o for o in outcomes if o.exit > 1]
            assert sum(o.deadline_met for o in deep) >= len(deep) / 2, [(o.exit, o.deadline_met) for o in deep]

            # The burst is over: within seconds an idle request reaches the main exit again.
            give_up = time.monotonic() + 5
            while True:
                out = await service.run(x, plan, deadline=time.perf_counter() + 0.1)
                if out.exit == NUM_EXITS or time.monotonic() > give_up:
                    break
                await asyncio.sleep(0.2)
            assert (out.exit, out.deadline_met) == (NUM_EXITS, True)
            assert service.queue_delay_s() == 0.0
        finally:
            await service.stop()

    asyncio.run(main())


def test_idle_probes_keep_every_graph_measured(service):
    async def main():
        await service.start()
        try:
            give_up = time.monotonic() + 5
            while time.monotonic() < give_up:
                if all(m.last_observed is not None for m in service.service_models.values()):
                    break
                await asyncio.sleep(0.1)
            assert all(m.last_observed is not None for m in service.service_models.values())
            # and probes never run while requests are in flight
            with service.admit():
                await asyncio.sleep(0.5)
                before = {n: m.last_observed for n, m in service.service_models.items()}
                await asyncio.sleep(0.5)
                assert {n: m.last_observed for n, m in service.service_models.items()} == before
        finally:
            await service.stop()

    asyncio.run(main())


def test_a_steady_stream_of_lone_requests_is_not_interleaved_with_probes(model_dir):
    # One request at a time with 5 ms gaps, as from one connection: quiet at a tick's instant, but no
    # lull. Probes ran in those gaps (and the next request waited); now only after a whole quiet tick
    # (0.2 s here: a stall of the test itself that long would let one in).
    service = _slowed_service(model_dir, probe_interval_s=0.8)

    async def main():
        await service.start()
        try:
            give_up = time.monotonic() + 5
            while not all(m.last_observed is not None for m in service.service_models.values()):
                assert time.monotonic() < give_up, "the idle prober never measured every graph"
                await asyncio.sleep(0.05)
            plan = service.plan(PolicyParams(exit=1))
            x = _x(service)
            unused = [name for name in service.service_models if name not in ("exit1", "stage1")]
            before = {name: service.service_models[name].last_observed for name in unused}
            stream_ends = time.monotonic() + 2.0  # ten ticks
            while time.monotonic() < stream_ends:
                await service.run(x, plan)
                await asyncio.sleep(0.005)
            assert {name: service.service_models[name].last_observed for name in unused} == before
            # A lull: the stale graphs are probed again.
            give_up = time.monotonic() + 5
            while {name: service.service_models[name].last_observed for name in unused} == before:
                assert time.monotonic() < give_up, "no probe after the stream ended"
                await asyncio.sleep(0.05)
        finally:
            await service.stop()

    asyncio.run(main())


def test_a_long_lull_is_probed_less_and_less(service):
    # probe_interval_s 0.2: early in a lull a graph is re-timed every 0.2 s or so, one graph per tick
    # (0.05 s); three seconds in, only once it has not run for half the lull (1.5 s and more).
    probes: list[tuple[float, str]] = []
    for name, model in service.service_models.items():
        observe = model.observe

        def counted(batch, seconds, observe=observe, name=name):
            probes.append((time.monotonic(), name))
            observe(batch, seconds)

        model.observe = counted

    async def main():
        await service.start()
        try:
            started = time.monotonic()
            await asyncio.sleep(4.0)
        finally:
            await service.stop()
        early = [name for t, name in probes if t < started + 1.5]
        late = [name for t, name in probes if started + 3.0 <= t < started + 4.0]
        assert len(early) > len(set(early)), early  # graphs re-timed within the first 1.5 s
        assert late and len(late) == len(set(late)), late  # none twice in a second, three seconds in

    asyncio.run(main())


# --- HTTP: policies, default deadline, slow clients ----------------------------------------------

POLICIES = {"eager": [0.9, 0.9], "strict": [cascade.NEVER, 0.9]}


@pytest.fixture(scope="module")
def policy_model_dir(tmp_path_factory):
    folder = build_model_folder(tmp_path_factory.mktemp("policies"))
    manifest = json.loads((folder / "manifest.json").read_text())
    score = policy_score(manifest, [0.3, 0.3, 0.4], accuracy=0.5)
    manifest["thresholds"] = {
        "rule": cascade.RULE,
        "calibrated_on": "val",
        "policies": {
            name: {"target": {"mean_gflops": 0.001}, "thresholds": t, "family": "shared", "val": score}
            for name, t in POLICIES.items()
        },
        "not_calibrated": [{"name": "unreachable", "target": {"accuracy": 1.0}, "reason": "not reached"}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _post(client, c, **params):
    return client.post(
        "/classify", content=encode(uniform_image(c), "PNG"), headers={"Content-Type": "image/png"}, params=params
    )


def test_named_and_per_exit_policies(policy_model_dir, tmp_path):
    with (
        ServerProcess(policy_model_dir, "--default-policy", "policy:strict", tmp_dir=tmp_path) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
    ):
        info = client.get("/v1/model").json()
        assert {n: p["thresholds"] for n, p in info["policies"].items()} == POLICIES
        for c in range(10):  # exit 1 is confident from bin 7, exit 2 from bin 4 (tests/serving_model.py)
            eager = _post(client, c, policy="eager").json()
            assert eager["exit"] == cascade_exit(c, 0.9) and eager["policy"] == "policy:eager"
            strict = _post(client, c).json()  # the default policy
            assert strict["exit"] == (2 if c >= 4 else 3) and strict["policy"] == "policy:strict"
            assert _post(client, c, confidence="1,0.9").json()["exit"] == strict["exit"]
        r = _post(client, 5, policy="unreachable")
        assert r.status_code == 422 and r.json()["accepted"] == ["eager", "strict"]
        r = _post(client, 5, confidence="0.9,0.9,0.9")
        assert r.status_code == 422 and "2 early exits" in r.json()["detail"]


def test_server_default_deadline_applies_to_requests_without_one(policy_model_dir, tmp_path):
    with (
        ServerProcess(policy_model_dir, "--default-budget-ms", "60000", tmp_dir=tmp_path) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
    ):
        body = _post(client, 1).json()
        assert (body["exit"], body["deadline_met"], body["policy"]) == (NUM_EXITS, True, "budget_ms")
        assert "deadline_met" not in _post(client, 1, exit=2).json()  # an explicit exit is exact
        assert _post(client, 8, policy="eager").json()["deadline_met"] is True
        metrics = client.get("/metrics").text
        assert 'eed_deadline_total{exit="3",outcome="met"} 1.0' in metrics


def test_hundreds_of_trickling_uploads_do_not_lock_out_other_clients(policy_model_dir, tmp_path):
    data = encode(uniform_image(3), "PNG")
    with ServerProcess(policy_model_dir, "--queue-size", "4", "--body-timeout-s", "3", tmp_dir=tmp_path) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        tricklers = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(
                    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    + f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data[:5]
                )
                tricklers.append(s)
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                codes = [
                    client.post("/classify", content=data, headers={"Content-Type": "image/png"}).status_code
                    for _ in range(20)
                ]
            assert codes == [200] * 20
            # Past the read deadline a trickler is told so (408) and its connection closed.
            tricklers[0].settimeout(15)
            reply = b""
            while chunk := tricklers[0].recv(65536):  # until the server closes the connection
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"body_timeout" in reply
        finally:
            for s in tricklers:
                s.close()


def test_hundreds_of_connections_trickling_headers_are_cut_off_and_lock_out_no_one(policy_model_dir, tmp_path):
    # The "slowloris" pattern: connections that begin a request and never finish its headers. Each
    # holds a socket and a file descriptor; past EED_HEADER_TIMEOUT_S it is told so and closed.
    data = encode(uniform_image(3), "PNG")
    with ServerProcess(policy_model_dir, "--header-timeout-s", "2", tmp_dir=tmp_path) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        tricklers = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
                tricklers.append(s)
            started = time.monotonic()
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                codes = [
                    client.post("/classify", content=data, headers={"Content-Type": "image/png"}).status_code
                    for _ in range(20)
                ]
            assert codes == [200] * 20
            for s in tricklers:
                s.settimeout(15)
                reply = b""
                while chunk := s.recv(65536):  # until the server closes the connection
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
                assert b'"error":"header_timeout"' in reply
            assert time.monotonic() - started < 15  # all of them, within a few header timeouts
        finally:
            for s in tricklers:
                s.close()


def _closed_loop_batches(model_dir, settle_ms: float) -> tuple[list[int], int]:
    """Four clients, each sending its next request 0/2/4/6 ms after its answer, on a service whose
    main-exit graph takes 20 ms: the batch sizes that graph ran, and how many requests ran alone."""
    runtime = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=1))
    batches: list[int] = []
    lone = [0]
    graph = runtime.exits[-1]
    run_batch, run_alone = graph.run, graph.run_alone

    def slow_batch(batch):
        batches.append(len(batch))
        time.sleep(0.02)
        return run_batch(batch)

    def slow_alone(batch):
        lone[0] += 1
        time.sleep(0.02)
        return run_alone(batch)

    graph.run, graph.run_alone = slow_batch, slow_alone
    svc = InferenceService(
        runtime, ServingMetrics(), max_batch_size=4, max_wait_ms=200, batch_settle_ms=settle_ms, probe_interval_s=0
    )
    svc.seed_latency(runtime.calibrate(runs=2, batch_sizes=(1, 4)))
    batches.clear()
    lone[0] = 0

    async def main():
        await svc.start()
        plan = svc.plan(PolicyParams(exit=NUM_EXITS))

        async def client(i: int) -> None:
            for _ in range(6):
                with svc.admit() as ticket:
                    await svc.run(_x(svc), plan, ticket)
                await asyncio.sleep(0.002 * i)

        try:
            await asyncio.gather(*(client(i) for i in range(4)))
        finally:
            await svc.stop()

    asyncio.run(main())
    return batches, lone[0]


def test_clients_answered_together_are_served_together_again(model_dir):
    # Clients that send their next request as soon as they are answered (wrk; any client keeping a
    # fixed number of requests in flight). Without waiting for them, the first one back found the
    # server idle and ran alone, or was cut into a batch of its own, and the rest queued behind it:
    # the clients split into groups served in turn, each group's answers and next requests handled
    # by the event loop beside the other's run. Expected back (batching.Settle), they stay together.
    batches, lone = _closed_loop_batches(model_dir, settle_ms=50)
    assert sum(batches) + lone == 24
    assert lone <= 1 and batches[-4:] == [4, 4, 4, 4]
    batches, lone = _closed_loop_batches(model_dir, settle_ms=0)
    assert sum(batches) + lone == 24 and max(batches[-4:]) < 4
