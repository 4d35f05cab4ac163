"""The replica's micro-batcher, without Ray: the batch wait applies only while the replica is busy."""

from __future__ import annotations

import asyncio

from serve.batcher import ModelBatcher
from serve.settings import BatchSettings

# Far longer than either test's deadline: a batch that waited for it would fail the test.
LONG_WAIT_S = 1.0  # the most BatchSettings allows


def test_a_lone_text_at_an_idle_replica_waits_for_nothing():
    calls: list[list[str]] = []

    async def run(texts, top_ks):
        calls.append(list(texts))
        return [f"{t}:{k}" for t, k in zip(texts, top_ks)]

    async def main():
        sizes: list[int] = []
        batcher = ModelBatcher(run, BatchSettings(batch_wait_timeout_s=LONG_WAIT_S), on_batch=sizes.append)
        for i in range(3):  # one at a time, like a single user: each finds the replica idle
            answer = await asyncio.wait_for(batcher.submit(f"t{i}", 2), timeout=LONG_WAIT_S / 2)
            assert answer == f"t{i}:2"
        return sizes, batcher.last_batch_size

    sizes, last = asyncio.run(main())
    assert calls == [["t0"], ["t1"], ["t2"]] and sizes == [1, 1, 1] and last == 1


def test_while_busy_a_batch_waits_to_fill_and_configure_applies_live():
    calls: list[list[str]] = []
    release = None

    async def run(texts, top_ks):
        calls.append(list(texts))
        if len(calls) == 1:
            await release.wait()  # the first batch is still on the model while more arrive
        return list(texts)

    async def main():
        nonlocal release
        release = asyncio.Event()
        batcher = ModelBatcher(run, BatchSettings(max_batch_size=4, batch_wait_timeout_s=LONG_WAIT_S))
        first = [batcher.submit(t, 1) for t in ("a", "b")]  # one batch of 2: the replica is busy after it
        await asyncio.sleep(0)  # the drain task takes them
        third = batcher.submit("c", 1)  # arrives during the model call
        release.set()
        await asyncio.gather(*first)
        fourth = batcher.submit("d", 1)  # arrives while the batcher waits for the next batch to fill
        await asyncio.wait_for(asyncio.gather(third, fourth), timeout=30)
        batcher.configure(BatchSettings(max_batch_size=1, batch_wait_timeout_s=0.0))
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(t, 1) for t in "xyz")), timeout=30)
        return batcher

    batcher = asyncio.run(main())
    assert calls == [["a", "b"], ["c", "d"], ["x"], ["y"], ["z"]]
    assert (batcher.max_batch_size, batcher.batch_wait_timeout_s) == (1, 0.0)


def test_the_shipped_serve_configs_write_out_the_batching_defaults():
    """BatchSettings is the home of the defaults; the Serve configs repeat them (Serve's YAML cannot
    refer to Python), so this keeps the copies equal to the home."""
    from pathlib import Path

    import yaml

    cluster = Path(__file__).resolve().parent.parent / "cluster"
    configs = {name: yaml.safe_load((cluster / name).read_text()) for name in ("serve_local.yaml", "serve_cluster.yaml")}
    kuberay = [doc for doc in yaml.safe_load_all((cluster / "kuberay.yaml").read_text()) if doc and "serveConfigV2" in
               doc.get("spec", {})]
    assert len(kuberay) == 1
    configs["kuberay.yaml"] = yaml.safe_load(kuberay[0]["spec"]["serveConfigV2"])
    defaults = BatchSettings().model_dump()
    for name, config in configs.items():
        found = [dep["user_config"] for app in config["applications"] for dep in app.get("deployments", [])
                 if dep["name"] == "Classifier"]
        assert found == [defaults], f"cluster/{name}: Classifier user_config {found} is not BatchSettings' {defaults}"
