"""The cascade-efficiency part of ``serve_bench.py`` (target 3 of issue 13).

Over real Fashion-MNIST test images sent one at a time, each server answers every image with
``?exit=<main>`` and as a confidence cascade, the modes alternating image by image; efficiency is
the share of mean ``inference_ms`` the cascade saves over the share of mean GFLOPs it saves. The
answers are checked against the same rule simulated offline on raw ORT outputs (agreement), and two
ceilings come with the figure: the server's ORT runs alone (from its /metrics) and the same graphs
timed in this process without HTTP. The ratio divides by the main exit's time, so anything that
slows the main exit flatters it: compare variants by the latencies, the ratio only within one.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.server import start_servers
from benchmarks.wrk import write_bundle

ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIRS = (ROOT / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
SETTLE_S = 0.3  # after a load run, for the answers then in ORT to be counted


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def rel_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def ratio_text(value: float | None) -> str:
    """A ratio for the printout; n/a where the cascade saved no GFLOPs (nothing to compare)."""
    return "n/a" if value is None else f"{value:.2f}"


def fashion_mnist_test(limit: int, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, Path]:
    """The first ``limit`` Fashion-MNIST test images (uint8 28×28) and labels, from the idx files."""
    for folder in [data_dir] if data_dir else list(FMNIST_DIRS):
        images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
        if images.is_file() and labels.is_file():
            x = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
            y = np.frombuffer(gzip.decompress(labels.read_bytes()), np.uint8, offset=8)
            return x[:limit], y[:limit].astype(int), folder
    raise SystemExit("Fashion-MNIST test files not found (apt-get install dataset-fashion-mnist, or --fmnist-dir)")


def offline_cascade(runtime, bodies: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image and exit: top probability and prediction, from the stage chain of ``runtime``
    (a ``ModelRuntime``) in this process; and the preprocessed images."""
    from serving import cascade
    from serving.images import Preprocessor

    pre = Preprocessor.from_spec(runtime.manifest.input, 4096 * 4096)
    x = np.stack([pre(b, "image/png") for b in bodies])
    conf, pred = [], []
    for start in range(0, len(x), 64):
        feats, c, p = x[start : start + 64], [], []
        for graph in runtime.stages:
            outputs = graph.run(feats)
            c.append(cascade.top_probability(outputs[0]))
            p.append(outputs[0].argmax(-1))
            if len(outputs) > 1:
                feats = outputs[1]
        conf.append(np.stack(c, 1))
        pred.append(np.stack(p, 1))
    return np.concatenate(conf), np.concatenate(pred), x


def in_process_cascade(runtime, x: np.ndarray, thresholds: np.ndarray, server_options) -> dict:
    """The graphs the server runs for a lone request, timed in this process without HTTP.

    ``runtime`` (a ``ModelRuntime`` opened with the server's options) gets what the server adds
    at load (lone-request sessions chosen, cascade fused or not by the same rule); image by
    image, main exit and cascade in turn as the benchmark sends them; batch 1. What the
    server's cascade could save if answering cost nothing but ORT.
    """
    from serving import cascade
    from serving.fused import attach_fused_cascade, cap_thresholds

    runtime.choose_lone_sessions(server_options)
    how = attach_fused_cascade(runtime, "auto", server_options)
    k = runtime.manifest.num_exits
    main, fused = runtime.exits[-1], runtime.fused
    row = cap_thresholds(thresholds, k)[None]

    def run_cascade(image: np.ndarray) -> int:
        if fused is not None:
            return int(fused.run_alone((image, row))[1][0])
        features = image
        for number, stage in enumerate(runtime.stages, 1):
            outputs = stage.run_alone(features)
            top = float(cascade.top_probability(outputs[0])[0])
            if number == k or cascade.stops_at(top, thresholds, number):
                return number
            features = outputs[1]
        return k

    for image in x[:20]:  # warm-up
        main.run_alone(image[None])
        run_cascade(image[None])
    t_main, t_casc, exits = [], [], []
    for i, image in enumerate(x):
        batch = image[None]
        for mode in ("main", "cascade") if i % 2 == 0 else ("cascade", "main"):
            t0 = time.perf_counter()
            if mode == "main":
                main.run_alone(batch)
                t_main.append(time.perf_counter() - t0)
            else:
                exits.append(run_cascade(batch))
                t_casc.append(time.perf_counter() - t0)
    cumulative = np.cumsum([e.stage_gflops for e in runtime.manifest.exits])
    gflops_saved = 1 - float(np.mean(cumulative[np.asarray(exits) - 1])) / runtime.manifest.exits[-1].gflops
    time_saved = 1 - float(np.mean(t_casc)) / float(np.mean(t_main))
    return {
        "cascade_ran": "fused" if fused is not None else "stages",
        "why": how,
        "lone_requests": runtime.lone_sessions,
        "main_ms": float(np.mean(t_main) * 1e3),
        "cascade_ms": float(np.mean(t_casc) * 1e3),
        "gflops_saved": gflops_saved,
        "time_saved": time_saved,
        "efficiency": time_saved / gflops_saved if gflops_saved > 0 else None,
    }


def scrape(port: int, *sample_names: str) -> list[tuple[dict[str, str], float]]:
    """The server's /metrics samples called any of ``sample_names`` (e.g. a histogram's ``_sum``), as
    (labels, value), from one scrape (so that counters read together are of one moment), read with
    Prometheus's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return [
        (sample.labels | {"__name__": sample.name}, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in sample_names
    ]


def ort_seconds(port: int, k: int) -> tuple[float, float]:
    """Seconds the server has spent in ORT so far (its eed_inference_latency_seconds sums):
    (main-exit graph, cascade graphs: the fused graph and the stage graphs)."""
    main = cascades = 0.0
    for labels, value in scrape(port, "eed_inference_latency_seconds_sum"):
        if labels.get("graph") == "exit" and labels.get("exit") == str(k):
            main += value
        elif labels.get("graph") in ("cascade", "stage"):
            cascades += value
    return main, cascades


def served_so_far(port: int) -> dict[str, Any]:
    """The server's running totals that a load run's answers move: answers computed (by exit), GFLOPs
    spent and ORT seconds (every graph), from one scrape of its /metrics. Computed answers count
    whatever their status: the requests in flight when a load generator stops are computed and
    counted as 499s (their GFLOPs are spent all the same)."""
    answers: dict[int, float] = {}
    totals = {"eed_gflops_spent_total": 0.0, "eed_inference_latency_seconds_sum": 0.0}
    for labels, value in scrape(port, "eed_requests_total", *totals):
        name = labels["__name__"]
        if name in totals:
            totals[name] += value
        elif labels.get("exit", "").isdigit():
            answers[int(labels["exit"])] = answers.get(int(labels["exit"]), 0.0) + value
    return {
        "answers": sum(answers.values()),
        "per_exit": answers,
        "gflops": totals["eed_gflops_spent_total"],
        "ort_s": totals["eed_inference_latency_seconds_sum"],
    }


def load_run(server, query: str, k: int, bundle: Path, args, load: Callable[..., dict]) -> dict[str, Any]:
    """One load run of ``args.connections`` connections sending the bundle's images in turn to
    ``/classify?QUERY``: answers/s (wrk's), and from the server's metrics GFLOPs and ORT time per
    answer and the answers' exits. Every run starts at the bundle's first image: a run shorter
    than the bundle sees its first images only, the same for both modes (the default runs send
    each image several times over)."""
    path = f"/classify?{query}&top_k=1"
    with server.running():
        load(server.url, path, args.connections, 1.0, bundle)  # settle: batch sizes and estimates
        # The answers still being computed when a load generator stops are counted by the server
        # (as 499s) a moment later: before each snapshot, so each run's count holds its own.
        time.sleep(SETTLE_S)
        before = served_so_far(server.port)
        served = load(server.url, path, args.connections, args.seconds, bundle)
        time.sleep(SETTLE_S)
        after = served_so_far(server.port)
    answers = after["answers"] - before["answers"]
    return {
        "answers_per_s": served["rps"],
        "errors": served["errors"],
        "p50_ms": served["p50_ms"],
        "gflops_per_answer": (after["gflops"] - before["gflops"]) / answers if answers else None,
        "ort_ms_per_answer": (after["ort_s"] - before["ort_s"]) * 1e3 / answers if answers else None,
        "exit_shares": [  # exits 1..k
            (after["per_exit"].get(e, 0.0) - before["per_exit"].get(e, 0.0)) / answers if answers else None
            for e in range(1, k + 1)
        ],
    }


def cascade_at_saturation(servers, bundle: Path, k: int, query: str, args, load: Callable[..., dict]) -> dict:
    """Per server: the main exit and the cascade under ``args.connections`` connections, alternating
    for ``args.rounds`` rounds over the bundle's images. What a cascade buys a loaded server: the
    time per answer it saves (1 - main answers/s over cascade answers/s) against the GFLOPs per
    answer it saves — batches of 32 amortise what a lone request pays per ORT call and stage."""
    per_server = {}
    for server in servers:
        runs: dict[str, list[dict]] = {"main": [], "cascade": []}
        for r in range(args.rounds):
            modes = [("main", f"exit={k}"), ("cascade", query)]
            for mode, q in modes if r % 2 == 0 else modes[::-1]:
                runs[mode].append(load_run(server, q, k, bundle, args, load))
        rounds = [saturation_round(main, casc) for main, casc in zip(runs["main"], runs["cascade"])]
        # Every figure is a median over the same rounds: those whose runs both had answers and
        # whose cascade spent fewer GFLOPs (a ratio over no saving means nothing).
        counted = [r for r in rounds if r is not None and r["gflops_saved"] > 0]

        per_server[server.name] = {
            "connections": args.connections,
            "seconds": args.seconds,
            "rounds_counted": len(counted),
            "main_answers_per_s": _median(counted, "main_answers_per_s"),
            "cascade_answers_per_s": _median(counted, "cascade_answers_per_s"),
            "gflops_saved": _median(counted, "gflops_saved"),
            "time_per_answer_saved": _median(counted, "time_per_answer_saved"),
            "efficiency": _median(counted, "efficiency"),
            "efficiency_of_ort_runs": _median(counted, "efficiency_of_ort_runs"),
            "errors": sum(m["errors"] for m in runs["main"] + runs["cascade"]),
            "rounds": rounds,
            "runs": runs,
        }
    return per_server


def saturation_line(model: str, server: str, sat: dict[str, Any]) -> str:
    """The one-line account of :func:`cascade_at_saturation`'s figures for one server, printed as
    they are measured and in the report's summary."""
    head = f"[{server}] {model}, {sat['connections']} connections"
    if not sat["rounds_counted"]:
        return f"{head}: no round with answers"
    return (
        f"{head}, the test images in turn: the cascade answers {sat['cascade_answers_per_s']:.0f}/s against the main "
        f"exit's {sat['main_answers_per_s']:.0f}/s (GFLOPs per answer saved {100 * sat['gflops_saved']:.1f} %, time "
        f"per answer saved {100 * sat['time_per_answer_saved']:.1f} %): efficiency {ratio_text(sat['efficiency'])} "
        f"(its ORT runs {ratio_text(sat['efficiency_of_ort_runs'])})"
        + (f"; NOT VALID: {sat['errors']} error answers or socket errors" if sat["errors"] else "")
    )


def _median(rounds: list[dict[str, float]], key: str) -> float | None:
    return float(np.median([r[key] for r in rounds])) if rounds else None


def saturation_round(main: dict, casc: dict) -> dict[str, float] | None:
    """One round's figures from its two load runs (:func:`load_run`); None when either run had no
    answers to divide by (every request refused, say), so the round is reported but not counted."""
    needed = ("gflops_per_answer", "answers_per_s", "ort_ms_per_answer")  # None or 0 without answers
    if not all(run[key] for run in (main, casc) for key in needed):
        return None
    gflops_saved = 1 - casc["gflops_per_answer"] / main["gflops_per_answer"]
    time_saved = 1 - main["answers_per_s"] / casc["answers_per_s"]
    ort_saved = 1 - casc["ort_ms_per_answer"] / main["ort_ms_per_answer"]
    return {
        "main_answers_per_s": main["answers_per_s"],
        "cascade_answers_per_s": casc["answers_per_s"],
        "gflops_saved": gflops_saved,
        "time_per_answer_saved": time_saved,
        "efficiency": time_saved / gflops_saved if gflops_saved else float("nan"),
        "efficiency_of_ort_runs": ort_saved / gflops_saved if gflops_saved else float("nan"),
    }


def cascade_path(port: int) -> str:
    """How the server ran the cascades: "fused" (one ORT call) or "stages", from its batch metrics."""
    fused = sum(value for labels, value in scrape(port, "eed_batch_size_count") if labels.get("graph") == "cascade")
    return "fused" if fused > 0 else "stages"


class Client:
    """One keep-alive HTTP/1.1 connection to a server's /classify."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def classify(self, body: bytes, query: str) -> dict:
        self.conn.request("POST", f"/classify?{query}", body=body, headers={"Content-Type": "image/png"})
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"/classify?{query} answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)


CASCADE_BLOCK = 25  # images per server turn in a multi-server cascade run


def bench_cascade(
    model_dir: Path, args, variants, workdir: Path, server_options, load: Callable[..., dict] | None = None
) -> dict:
    """Cascade efficiency on ``model_dir``: sequential requests (the target's figure), the same
    graphs in this process, and — with ``load`` (``serve_bench.run_load``) — under saturation."""
    from serving import cascade
    from serving.manifest import load_manifest
    from serving.runtime import ModelRuntime

    manifest = load_manifest(model_dir)
    k = manifest.num_exits
    images, labels, source = fashion_mnist_test(args.images, args.fmnist_dir)
    if manifest.input.channels == 3:
        images = np.repeat(images[..., None], 3, axis=-1)  # the server would do L → RGB itself anyway
    bodies = [png(im) for im in images]
    runtime = ModelRuntime.load(model_dir, server_options)  # one load for both in-process parts
    conf, pred, x = offline_cascade(runtime, bodies)
    policies = manifest.thresholds.policies if manifest.thresholds is not None else {}
    if args.policy and args.policy in policies:
        query, chosen = f"policy={args.policy}", f"calibrated policy {args.policy}"
        thresholds = cascade.as_thresholds(policies[args.policy].thresholds, k)
    else:  # an untrained or uncalibrated model: each early exit keeps the images above its median confidence
        thresholds = np.asarray([float(np.median(conf[:, i])) for i in range(k - 1)])
        query = "confidence=" + ",".join(f"{t:.9g}" for t in thresholds)
        thresholds = np.asarray([float(f"{t:.9g}") for t in thresholds])
        chosen = "per-exit thresholds at the median top probability of each early exit on these images"
    simulated = cascade.simulate(conf, pred, thresholds, [e.stage_gflops for e in manifest.exits])
    servers = start_servers(model_dir, variants, workdir, args.providers)
    runs: dict = {s.name: {"main": [], "cascade": []} for s in servers}
    try:
        clients = {s.name: Client(s.port) for s in servers}
        ort_before, ort_after, how = {}, {}, {}
        loaded: dict[str, dict] = {}
        for server in servers:
            with server.running():
                for body in bodies[:50]:  # warm-up
                    clients[server.name].classify(body, f"exit={k}&top_k=1")
                    clients[server.name].classify(body, query + "&top_k=1")
                ort_before[server.name] = ort_seconds(server.port, k)
        # Image by image, both modes in turn (the order rotating), so that a busy moment of the
        # machine hits both alike. Servers take turns by blocks of images, not image by image,
        # the others paused: ORT's threads spin for a while after an answer (EED_ORT_SPIN_US) and
        # an idle server probes its graphs, which on a small machine would slow the server measured.
        modes = [("main", f"exit={k}"), ("cascade", query)]
        block = CASCADE_BLOCK if len(servers) > 1 else len(bodies)
        for b, start in enumerate(range(0, len(bodies), block)):
            for n in range(len(servers)):
                server = servers[(b + n) % len(servers)]
                with server.running():
                    for i in range(start, min(start + block, len(bodies))):
                        for j in range(len(modes)):
                            mode, q = modes[(i + j) % len(modes)]
                            runs[server.name][mode].append(clients[server.name].classify(bodies[i], q + "&top_k=1"))
        for server in servers:
            with server.running():
                ort_after[server.name] = ort_seconds(server.port, k)
                how[server.name] = cascade_path(server.port)
        if load is not None:
            bundle = write_bundle(workdir / f"{manifest.name}-images.bundle", bodies)
            loaded = cascade_at_saturation(servers, bundle, k, query, args, load)
    finally:
        for server in servers:
            server.stop()
    main_gflops = manifest.exits[-1].gflops
    per_variant = {}
    for name, modes in runs.items():
        main, casc = modes["main"], modes["cascade"]
        t_main = float(np.mean([a["inference_ms"] for a in main]))
        t_casc = float(np.mean([a["inference_ms"] for a in casc]))
        l_main = float(np.mean([a["latency_ms"] for a in main]))
        l_casc = float(np.mean([a["latency_ms"] for a in casc]))
        g_casc = float(np.mean([a["gflops"] for a in casc]))
        gflops_saved = 1 - g_casc / main_gflops
        time_saved = 1 - t_casc / t_main
        # The same split from the server's own ORT timings (its metrics), per request.
        ort_main = (ort_after[name][0] - ort_before[name][0]) * 1e3 / len(main)
        ort_casc = (ort_after[name][1] - ort_before[name][1]) * 1e3 / len(casc)
        ort_saved = 1 - ort_casc / ort_main
        served_exit = np.asarray([a["exit"] for a in casc])
        served_label = np.asarray([a["label"] for a in casc])
        per_variant[name] = {
            "main_inference_ms": t_main,
            "cascade_inference_ms": t_casc,
            "main_latency_ms": l_main,
            "cascade_latency_ms": l_casc,
            "main_inference_ms_median": float(np.median([a["inference_ms"] for a in main])),
            "cascade_inference_ms_median": float(np.median([a["inference_ms"] for a in casc])),
            "main_gflops": main_gflops,
            "cascade_gflops": g_casc,
            "gflops_saved": gflops_saved,
            "inference_time_saved": time_saved,
            "latency_saved": 1 - l_casc / l_main,
            "efficiency": time_saved / gflops_saved if gflops_saved > 0 else None,
            "main_ort_ms": ort_main,
            "cascade_ort_ms": ort_casc,
            "efficiency_of_ort_runs": ort_saved / gflops_saved if gflops_saved > 0 else None,
            "cascade_ran": how[name],
            "exit_counts": np.bincount(served_exit, minlength=k + 1)[1:].tolist(),  # images per exit (of "images")
            "agreement_with_offline_rule": float(
                np.mean((served_exit == simulated.exit) & (served_label == simulated.prediction))
            ),
            "accuracy_main": float(np.mean(np.asarray([a["label"] for a in main]) == labels)),
            "accuracy_cascade": float(np.mean(served_label == labels)),
        }
        v = per_variant[name]
        print(
            f"  {manifest.name} [{name}, {how[name]}]: GFLOPs saved {100 * gflops_saved:.1f} %, inference time saved "
            f"{100 * time_saved:.1f} % (efficiency {ratio_text(v['efficiency'])}; of its ORT runs alone "
            f"{ratio_text(v['efficiency_of_ort_runs'])}: {ort_main:.3f} vs {ort_casc:.3f} ms), latency saved "
            f"{100 * v['latency_saved']:.1f} %, agreement {100 * v['agreement_with_offline_rule']:.2f} %, "
            f"accuracy main {100 * v['accuracy_main']:.2f} % cascade {100 * v['accuracy_cascade']:.2f} %",
            flush=True,
        )
        if load is not None:
            v["at_saturation"] = loaded[name]
            print(f"  {saturation_line(manifest.name, name, loaded[name])}", flush=True)
    bare = in_process_cascade(runtime, x, thresholds, server_options)
    print(
        f"  {manifest.name} [the same graphs in this process, no HTTP; {bare['cascade_ran']}]: main "
        f"{bare['main_ms']:.3f} ms, cascade {bare['cascade_ms']:.3f} ms, efficiency {ratio_text(bare['efficiency'])}",
        flush=True,
    )
    return {
        "model_dir": rel_path(model_dir),
        "model": manifest.name,
        "images": len(bodies),
        "in_process": bare,
        "source": str(source),
        # Fashion-MNIST test images: their labels score only a Fashion-MNIST model (the untrained
        # full-width CIFAR export is timed on them, not scored)
        "accuracy_meaningful": manifest.dataset == "fashion-mnist",
        "query": query,
        # Which thresholds (a calibrated policy, or the medians); how each server ran the cascade is
        # the variant's "cascade_ran". Until 2026-12-02 this key held the latter by mistake.
        "thresholds": chosen,
        "variants": per_variant,
    }
