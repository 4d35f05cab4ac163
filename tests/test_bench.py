"""The benchmark's own machinery: statistics, failure classification, open-loop scheduling."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter

import numpy as np
import pytest
from aiohttp import web

from bench.load import arrival_times, closed_loop, open_loop
from bench.stats import StepResult, goodput
from tests.conftest import free_port


def test_summary_statistics_on_a_synthetic_latency_list():
    lat = [i / 1000 for i in range(1, 1001)]  # 1..1000 ms
    r = StepResult(users=10, duration_s=2.0, latencies_s=lat, statuses=Counter({200: 1000, 500: 3, 429: 2}),
                   timeouts=4, connection_errors=1, bytes_received=2048 * 10)
    s = r.summary()
    assert s["complete"] == 1000 and s["tps"] == 500.0
    assert s["failed"] == 3 + 2 + 4 + 1
    assert s["failed_by_kind"] == {"non_2xx": {"429": 2, "500": 3}, "timeouts": 4, "connection_errors": 1, "dropped": 0}
    assert s["p50_ms"] == pytest.approx(np.percentile(np.array(lat) * 1000, 50))
    assert s["p99_ms"] == pytest.approx(990.01) and s["max_ms"] == pytest.approx(1000.0)
    assert s["mean_ms"] == pytest.approx(500.5) and s["transfer_kb_s"] == pytest.approx(10.0)


def test_goodput_is_the_fastest_step_with_p99_under_1s_and_no_failures():
    rows = [{"users": 1, "tps": 100, "p99_ms": 10, "failed": 0, "complete": 1},
            {"users": 64, "tps": 900, "p99_ms": 400, "failed": 0, "complete": 1},
            {"users": 300, "tps": 950, "p99_ms": 1200, "failed": 0, "complete": 1},
            {"users": 400, "tps": 990, "p99_ms": 800, "failed": 2, "complete": 1}]
    assert goodput(rows)["users"] == 64
    assert goodput([rows[2]]) is None


@pytest.fixture(scope="module")
def tiny_server():
    """A local aiohttp server with routes that succeed, fail, stall and drop connections."""
    async def ok(_r):
        return web.json_response({"label": "x"})

    async def err(_r):
        return web.json_response({"error": {"code": "boom"}}, status=500)

    async def busy(_r):
        return web.Response(status=503, headers={"Retry-After": "1"})

    async def stall(_r):
        await asyncio.sleep(3)
        return web.json_response({})

    async def drop(request):
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    port, loop, ready = free_port(), asyncio.new_event_loop(), threading.Event()

    async def start():
        app = web.Application()
        for path, handler in [("/ok", ok), ("/err", err), ("/busy", busy), ("/stall", stall), ("/drop", drop)]:
            app.router.add_post(path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        return runner

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.mark.parametrize("route, check", [
    ("/ok", lambda s: s["complete"] > 0 and s["failed"] == 0),
    ("/err", lambda s: s["complete"] == 0 and s["failed_by_kind"]["non_2xx"].get("500", 0) == s["failed"] > 0),
    ("/busy", lambda s: s["failed_by_kind"]["non_2xx"].get("503", 0) > 0),
    ("/stall", lambda s: s["failed_by_kind"]["timeouts"] == 4 and s["complete"] == 0),
    ("/drop", lambda s: s["failed_by_kind"]["connection_errors"] > 0 and s["complete"] == 0),
])
def test_failures_are_classified(tiny_server, route, check):
    summary = asyncio.run(closed_loop(tiny_server + route, users=4, duration_s=0.5, texts=["hi"], timeout_s=1.0)).summary()
    assert check(summary), summary


def test_arrival_schedules():
    constant = arrival_times(50, 2.0, poisson=False)
    assert len(constant) == 99 and np.allclose(np.diff(constant), 0.02)
    poisson = arrival_times(200, 10.0, poisson=True, seed=3)
    assert poisson == arrival_times(200, 10.0, poisson=True, seed=3)  # seeded
    assert 1800 < len(poisson) < 2200 and np.std(np.diff(poisson)) > 0.002  # ~rate, not regular


def test_open_loop_keeps_its_schedule_and_counts_what_it_cannot_send(tiny_server):
    s = asyncio.run(open_loop(tiny_server + "/ok", rate=100, duration_s=1.0, texts=["hi"], poisson=False)).summary()
    assert 95 <= s["complete"] <= 100 and s["dropped"] == 0 and s["offered_rate"] == 100
    # A stalled server does not slow the sender down: slots keep coming, excess is dropped.
    s = asyncio.run(open_loop(tiny_server + "/stall", rate=50, duration_s=1.0, texts=["hi"], poisson=False,
                              timeout_s=5, max_in_flight=10)).summary()
    assert s["dropped"] >= 30 and s["complete"] == 10


def test_bench_help_exits_0_and_lists_commands():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("compare", "serving", "freshness", "profile", "drift", "features"):
        assert command in done.stdout
    assert subprocess.run([sys.executable, "-m", "bench", "nonsense"], capture_output=True, timeout=60).returncode == 2


def test_compare_options_parse():
    from bench.compare import parse_args

    a = parse_args(["--store", "s", "--systems", "textserve-noop-1,textserve-default,tuned-single",
                    "--users", "64,400", "--no-keepalive", "--repeat", "5"])
    assert a.systems == ["textserve-noop-1", "textserve-default", "tuned-single"] and a.users == [64, 400]
    assert a.no_keepalive and a.repeat == 5 and a.rates == []
    d = parse_args(["--store", "s"])
    assert d.repeat == 3 and not d.no_keepalive
    assert "textserve-batched-1-cnn" not in d.systems  # needs a CNN store
    both = parse_args(["--store", "s", "--cnn-store", "c", "--systems", "textserve-batched-1,textserve-batched-1-cnn"])
    assert both.cnn_store == "c" and both.systems == ["textserve-batched-1", "textserve-batched-1-cnn"]
    assert "textserve-batched-1-cnn" in parse_args(["--store", "s", "--cnn-store", "c"]).systems
    assert "textserve-noop-2" not in d.systems  # on request only
    assert parse_args(["--store", "s", "--systems", "textserve-noop-2"]).systems == ["textserve-noop-2"]
    for bad in (["--repeat", "0"], ["--systems", "nope"], ["--systems", "textserve-batched-1-cnn"]):
        with pytest.raises(SystemExit):
            parse_args(["--store", "s", *bad])


def test_repetitions_combine_into_median_and_spread():
    from bench.stats import combine_runs

    def run(tps, p99, failed):
        return {"users": 4, "tps": tps, "mean_ms": 1.0, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": p99, "max_ms": 9.0,
                "transfer_kb_s": 1.0, "complete": 10, "failed": failed}

    row = combine_runs([run(100.0, 30.0, 0), run(300.0, 10.0, 2), run(200.0, 20.0, 1)])
    assert row["tps"] == 200.0 and row["p99_ms"] == 20.0 and row["repeat"] == 3
    assert row["spread"]["tps"] == [100.0, 300.0] and row["spread"]["p99_ms"] == [10.0, 30.0]
    assert row["failed"] == 3 and row["complete"] == 30 and len(row["runs"]) == 3


def test_shipped_and_noop_systems_use_the_local_config():
    from bench.systems import ServeVariant, variant_config
    from serve.process import local_config

    shipped = variant_config(ServeVariant("d", kind="shipped"), "/s", 8000, "/tmp/x")
    want = local_config("/s", 8000)
    want["applications"][0]["args"]["learner"]["state_dir"] = "/tmp/x"
    assert shipped == want  # learner on, autoscaling as shipped
    noop = variant_config(ServeVariant("n", kind="noop"), "/s", 8000)["applications"][0]
    assert noop["import_path"] == "bench.noop_serve:app" and noop["deployments"][0]["num_replicas"] == 1


def test_profile_summary_from_a_speedscope_file():
    from bench.profile import thread_seconds, top_frames

    profile = {"shared": {"frames": [{"name": "loop", "file": "/a/x.py", "line": 1},
                                     {"name": "handler", "file": "/a/y.py", "line": 2}]},
               "profiles": [{"name": "t1", "samples": [[0, 1], [0], [0, 1, 1]], "weights": [0.01, 0.01, 0.02]}]}
    inclusive, own, total = top_frames(profile)
    assert total == pytest.approx(0.04)
    assert dict(inclusive)["loop (x.py:1)"] == pytest.approx(1.0)
    assert dict(inclusive)["handler (y.py:2)"] == pytest.approx(0.75)  # counted once per sample
    assert dict(own)["loop (x.py:1)"] == pytest.approx(0.25)
    assert thread_seconds(profile) == [("t1", pytest.approx(0.04))]


@pytest.mark.integration  # no Ray, but real models trained on the whole data set: not the fast lane
def test_features_bench_trains_each_feature_set_and_reports(tmp_path, capsys):
    """One epoch of the small Korean model per feature set, really trained (`python -m bench
    features`' main, in this process): a report with a row per model, the mean per feature set, a
    plot; bad feature sets are refused before anything trains."""
    import json

    from bench.__main__ import main

    out = tmp_path / "FEATURES"
    assert main(["features", "--langs", "ko", "--seeds", "0", "--features", "none,2-3", "--epochs", "1",
                 "--out", str(out)]) in (0, None)
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["char_ngrams"] for r in report["runs"]] == [[], [2, 3]]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["best_epoch"] == 1 for r in report["runs"])
    assert "| words + char 2/3-grams |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["features", "--features", "none,3-2", "--out", str(tmp_path / "BAD")])
    assert refused.value.code == 2 and "widths must be distinct, increasing" in capsys.readouterr().err
    assert not (tmp_path / "BAD.json").exists()


@pytest.mark.integration  # no Ray, but real models trained on the whole data set: not the fast lane
def test_quality_bench_scores_clean_and_perturbed_sets_and_keeps_earlier_runs(tmp_path, capsys):
    """`python -m bench quality`' main, in this process: a real 1-epoch CNN per recipe, scored on
    the clean test set and the robustness set by kind; a later command adds its rows to the
    report instead of replacing it; a bad recipe is refused before anything trains."""
    import json

    from bench.__main__ import main

    out = tmp_path / "QUALITY"
    common = ["quality", "--langs", "en", "--archs", "cnn", "--seeds", "0", "--epochs", "1", "--out", str(out)]
    assert main([*common, "--recipes", "none"]) == 0
    assert main([*common, "--recipes", "typos"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert sorted(r["recipe"] for r in report["runs"]) == ["none", "typos"]
    for r in report["runs"]:
        assert 0.0 < r["test_accuracy"] <= 1.0 and 0.0 < r["robust_accuracy"] <= 1.0
        assert set(r["robust_by_kind"]) == {"names", "numbers", "order", "padding", "typos"}
    md = out.with_suffix(".md").read_text()
    assert "| cnn small, augment none, 1 epochs |" in md and "| cnn small, augment typos, 1 epochs |" in md
    assert out.with_suffix(".png").stat().st_size
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main([*common, "--recipes", "typos+bogus"])
    assert refused.value.code == 2 and "augment kinds must be distinct" in capsys.readouterr().err


def test_quality_rows_name_their_features_and_older_rows_read_as_words():
    from bench.quality import command_for, config_key, config_name

    old = {"lang": "en", "arch": "cnn", "size": "small", "recipe": "names", "label_smoothing": 0.0, "epochs": 15,
           "seed": 1}  # a row written before --features existed
    sub = {**old, "char_ngrams": [2, 3, 4], "label_smoothing": 0.1, "subword_mix": "word+grams"}
    mean = {**sub, "subword_mix": None}  # a subword row written before the mix was recorded: rows averaged
    del mean["subword_mix"]
    assert config_name(old) == "cnn small, augment names"
    assert config_name(sub) == "cnn small, augment names, words + char 2/3/4-grams, label smoothing 0.1"
    assert config_name(mean) == "cnn small, augment names, mean of words and char 2/3/4-grams, label smoothing 0.1"
    assert config_key(old) != config_key(sub) and config_key(old) == config_key({**old, "char_ngrams": []})
    assert config_key(sub) != config_key(mean) and config_key(old) == config_key({**old, "subword_mix": None})
    assert command_for(old).endswith("--recipes names --seeds 1")
    assert command_for(sub).endswith("--label-smoothing 0.1 --features 2-3-4")
    assert command_for(mean).endswith("--features 2-3-4 (code of 2026-12-04: rows averaged)")


def test_model_cost_bench_measures_every_model_against_the_first(tmp_path):
    """`python -m bench model_cost`'s measurement and reports, in this process, tiny (its main
    would set this process's TensorFlow threads): every model at every batch size, a positive CPU
    time per text, the first model at 1.00x, and the three report files; bad options refused."""
    import json

    from bench.model_cost import MODELS, main, run

    out = tmp_path / "COST"
    run([1, 4], rounds=1, texts=8, out=str(out), command="python -m bench model_cost (test)")
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["batch"], r["model"]) for r in rows] == [(b, m[0]) for b in (1, 4) for m in MODELS]
    assert all(r["cpu_us_per_text"] > 0 for r in rows)
    assert [r["vs_first"] for r in rows if r["model"] == MODELS[0][0]] == [1.0, 1.0]
    assert "| 4 | cnn, words + char 2/3-grams |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size
    for bad in (["--batches", "0"], ["--batches", "x"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as refused:
            main([*bad, "--out", str(tmp_path / "BAD")])
        assert refused.value.code == 2
    assert not (tmp_path / "BAD.json").exists()


def test_cpu_sampler_tells_a_busy_process_from_an_idle_one():
    """bench cpu_split / freshness's per-process CPU, on two real processes: one spinning, one asleep."""
    import subprocess
    import sys

    import psutil

    from bench.cpu_split import CpuSampler, process_label

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        labels = {}
        for name, proc in (("busy", busy), ("idle", idle)):
            ps = psutil.Process(proc.pid)
            ps.info = {"cmdline": ps.cmdline(), "name": ps.name()}  # as process_iter fills it
            labels[name] = process_label(ps)
        thread, usage = CpuSampler().window(0.0, 1.5)
        thread.join(timeout=10)
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert labels["busy"] != labels["idle"]
    assert usage[labels["busy"]] > 30, usage.most_common(5)  # a core's worth, minus what 2 shared cores lend
    assert usage[labels["idle"]] < 10, usage.most_common(5)


AB_SAMPLE = """Concurrency Level:      400
Time taken for tests:   5.000 seconds
Complete requests:      8000
Failed requests:        3
   (Connect: 0, Receive: 3, Length: 0, Exceptions: 0)
Non-2xx responses:      5
Transfer rate:          512.25 [Kbytes/sec] received
Time per request:       250.100 [ms] (mean)
Time per request:       0.625 [ms] (mean, across all concurrent requests)
Percentage of the requests served within a certain time (ms)
  50%    200
  66%    210
  90%    300
  99%    640
 100%    900 (longest request)
"""


def test_apache_bench_report_as_a_step():
    from bench.ab import parse_ab

    row = parse_ab(AB_SAMPLE, 400)
    # ab counts non-2xx answers as complete: here they are failures, and only 2xx count as answered.
    assert row["complete"] == 8000 - 3 - 5 and row["failed"] == 8
    assert row["tps"] == pytest.approx((8000 - 8) / 5.0)
    assert (row["p50_ms"], row["p90_ms"], row["p99_ms"], row["max_ms"]) == (200, 300, 640, 900)
    assert row["mean_ms"] == 250.1 and row["transfer_kb_s"] == 512.25
    assert parse_ab("", 10)["complete"] == 0  # ab stopped before its report: nothing answered


@pytest.mark.parametrize("server_spins", [True, False], ids=["busy_server", "idle_server"])
def test_cpu_meter_counts_the_server_tree_not_the_client(server_spins):
    """A server whose grandchild spins is charged for it; a sleeping one is charged ~nothing while
    this process (the "client") spins. Bounds are loose: the machine's cores are shared."""
    import subprocess
    import sys
    import time

    from bench.cpu_cost import CpuMeter, server_processes
    from tests._helpers import wait_until

    work = "while True: pass" if server_spins else "import time; time.sleep(60)"
    tree = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {work!r}])"
    server = subprocess.Popen([sys.executable, "-c", tree], start_new_session=True)
    try:
        # Both processes up (the grandchild's Python started, so its start-up is spent) before the window.
        wait_until(lambda: len(server_processes(server.pid)) == 2, timeout=30, what="the server's grandchild")
        meter = CpuMeter(server.pid)
        meter.start()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass
        cost = meter.stop(answered=500)
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    assert cost["server_processes"] == 2, cost  # the parent and the grandchild
    assert cost["client_cpu_s"] > 0.3, cost
    if server_spins:
        assert 0.2 < cost["server_cpu_s"] < 1.8, cost
        assert cost["cpu_s_per_1k"] == pytest.approx(cost["server_cpu_s"] * 2, rel=0.01)
    else:
        assert cost["server_cpu_s"] < 0.15, cost


def test_every_setting_a_variant_changes_is_listed(monkeypatch):
    from bench.compare import VARIANTS
    from bench.compare_report import changes_line
    from bench.systems import variant_changes

    assert variant_changes(VARIANTS["textserve-default"]) == {}  # the shipped config as shipped
    unbatched = variant_changes(VARIANTS["textserve-unbatched-1"])
    assert unbatched["applications.0.deployments.0.user_config.max_batch_size"] == (32, 1)
    assert unbatched["applications.0.deployments.0.num_replicas"] == (None, 1)
    assert unbatched["applications.0.args.learner"][1] is None  # the learner off
    assert "max_batch_size` 32 -> 1" in changes_line(unbatched)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", raising=False)  # "before" is the caller's environment
    lean = variant_changes(VARIANTS["textserve-default-nohametrics"])
    assert lean == {"environment.RAY_SERVE_HAPROXY_METRICS_ENABLED": (None, "0")}  # the environment only
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", "1")
    assert variant_changes(VARIANTS["textserve-default-nohametrics"]) == {
        "environment.RAY_SERVE_HAPROXY_METRICS_ENABLED": ("1", "0")}


def test_a_variants_environment_reaches_its_serve_run_and_only_the_shipped_kind_takes_one(tmp_path):
    from bench.compare import VARIANTS
    from bench.systems import ServeVariant, start_variant

    system = start_variant(VARIANTS["textserve-default-nohametrics"], str(tmp_path), port=1)
    system.command()  # renders the config and enters the hardened ingress, as a start does
    try:
        assert system.environment()["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    finally:
        system.cleanup()
    with pytest.raises(ValueError, match="only for the shipped kind"):
        start_variant(ServeVariant("x", env=(("A", "1"),)), str(tmp_path))
