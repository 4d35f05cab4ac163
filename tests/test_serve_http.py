"""The Serve application over real HTTP on 127.0.0.1, on a real local Ray."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import requests

from tests._helpers import FEEDBACK_TOKEN, http_ok, wait_until

AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


def predict(url, payload, **kw):
    return requests.post(f"{url}/v1/predict", json=payload, timeout=10, **kw)


def test_predict_single_and_list(base_url):
    r = predict(base_url, {"text": "turn on the kitchen light"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "HassTurnOn" and 0 < body["score"] <= 1
    assert isinstance(body["model_version"], int) and body["model_version"] >= 1
    assert len(body["top_k"]) == 3 and body["top_k"][0]["label"] == body["label"]
    r = predict(base_url, {"texts": ["turn off the fan", "what time is it"], "top_k": 1})
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["HassTurnOff", "HassGetCurrentTime"]
    assert all(len(p["top_k"]) == 1 and p["model_version"] == body["model_version"] for p in preds)


def test_model_and_health_routes(base_url):
    info = requests.get(f"{base_url}/v1/model", headers=AUTH, timeout=5).json()
    assert info["model_version"] >= 1 and "HassTurnOn" in info["labels"]
    # what tests/_helpers.deploy configures: BatchSettings' defaults
    from serve.settings import BatchSettings

    assert {k: info["batching"][k] for k in BatchSettings.model_fields} == BatchSettings().model_dump()
    health = requests.get(f"{base_url}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert requests.head(f"{base_url}/healthz", timeout=5).status_code == 200  # load balancers probe with HEAD
    spec = requests.get(f"{base_url}/openapi.json", timeout=5).json()
    assert "/v1/predict" in spec["paths"] and "/v1/model" in spec["paths"]


BAD = [
    (b'{"text": ', 400, "malformed_json"),
    (b'{"text": "caf\xe9"}', 400, "invalid_encoding"),
    (b'["just a list"]', 422, "invalid_request"),
    (b"{}", 422, "invalid_request"),
    (b'{"text": "a", "texts": ["b"]}', 422, "invalid_request"),
    (b'{"txt": "typo"}', 422, "invalid_request"),
    (b'{"text": ""}', 422, "empty_text"),
    (b'{"text": "   "}', 422, "empty_text"),
    (b'{"text": 42}', 422, "invalid_type"),
    (b'{"texts": "not a list"}', 422, "invalid_type"),
    (b'{"texts": ["ok", 3]}', 422, "invalid_type"),
    (b'{"texts": []}', 422, "empty_text"),
    (b'{"texts": ["ok", ""]}', 422, "empty_text"),
    (b'{"text": "ok", "top_k": 0}', 422, "invalid_type"),
    (json.dumps({"texts": ["a"] * 9}).encode(), 413, "too_many_texts"),
    (json.dumps({"text": "a" * 201}).encode(), 413, "text_too_long"),
    (json.dumps({"text": "a " * 3000}).encode(), 413, "body_too_large"),
]


@pytest.mark.parametrize("body, status, code", BAD, ids=[c for _, _, c in BAD])
def test_bad_input_gets_clear_4xx_and_app_keeps_serving(base_url, body, status, code):
    r = requests.post(f"{base_url}/v1/predict", data=body, timeout=10,
                      headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert predict(base_url, {"text": "turn on the light"}).status_code == 200


def test_unknown_route_and_wrong_method(base_url):
    r = requests.get(f"{base_url}/v2/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{base_url}/v1/predict", timeout=5)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def _burst(url: str, n: int, text="turn on the kitchen light") -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(i):
            async with session.post(f"{url}/v1/predict", json={"text": f"{text} {i}"}) as r:
                return r.status, await r.json(content_type=None)
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_batching_forms_batches_under_concurrent_load(base_url):
    results = asyncio.run(_burst(base_url, 128))
    assert all(status == 200 for status, _ in results)
    sizes = [body["batch_size"] for _, body in results]
    assert max(sizes) > 1, f"no batch above 1 in {sorted(sizes)}"


def deploy_config(base_url: str, store: str, user_config: dict) -> None:
    """Deploy cluster/serve_local.yaml as app "reconf" the declarative way (what serve deploy does)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve.process import local_config

    config = local_config(store, port=int(base_url.rsplit(":", 1)[1]))
    app = config["applications"][0]
    app.update(name="reconf", route_prefix="/reconf")
    app["args"]["learner"] = None
    dep = app["deployments"][0]
    dep.pop("autoscaling_config")  # one fixed replica: autoscaling must not add one while we look
    dep.update(num_replicas=1, user_config=user_config)
    dep["ray_actor_options"]["num_cpus"] = 0.25
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)


def test_reconfigure_changes_batching_without_restart(base_url, trained_store):
    from ray import serve

    from serve.settings import BatchSettings

    url = f"{base_url}/reconf"
    defaults = BatchSettings()
    assert defaults.max_batch_size > 1  # so that 1 below is a change
    deploy_config(base_url, trained_store, defaults.model_dump())
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout=120, what="reconf app")
        before = requests.get(f"{url}/v1/model", headers=AUTH, timeout=5).json()
        assert before["batching"] == {**defaults.model_dump(), "last_batch_size": before["batching"]["last_batch_size"]}
        deploy_config(base_url, trained_store, {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})

        def applied():
            info = requests.get(f"{url}/v1/model", headers=AUTH, timeout=5).json()
            return info["batching"]["max_batch_size"] == 1 and info

        info = wait_until(applied, timeout=60, what="max_batch_size 1 live")
        # The same replica process, same start time: reconfigured in place, not restarted.
        assert (info["pid"], info["started_at"]) == (before["pid"], before["started_at"])
        sizes = {body["batch_size"] for _, body in asyncio.run(_burst(url, 48))}
        assert sizes == {1}
    finally:
        serve.delete("reconf")


def test_unknown_fields_are_named_briefly(base_url):
    """A body with thousands of unknown keys gets a short 422, not its own keys echoed back."""
    body = json.dumps({f"k{i}": 1 for i in range(350)})  # under this app's 4 KB body limit
    r = requests.post(f"{base_url}/v1/predict", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text[:200]
    assert len(r.text) < 1000 and "and 340 more" in r.text


def test_learner_answers_to_submit_become_http_answers():
    """A standby learner's not_owner is a 503 the client retries (Retry-After: 1); nothing needs Ray."""
    from online_learning.protocol import Accepted, Conflict, NotOwnerAnswer, WriteFailed
    from serve.feedback import submit_answer
    from serve.requests import RequestError, error_body

    assert submit_answer(Accepted(((4, False), (2, True)))) == {"accepted": 1, "duplicates": 1, "offsets": [4, 2]}
    refusals = {
        "not_owner": (NotOwnerAnswer(3, "another learner owns /state (epoch 3)"), 503, "1"),
        "log_write_failed": (WriteFailed("ENOSPC", "disk full"), 507, "30"),
        "event_id_conflict": (Conflict("e1", 7), 409, None),
    }
    for code, (reply, status, retry_after) in refusals.items():
        with pytest.raises(RequestError) as caught:
            submit_answer(reply)
        err = caught.value
        assert (err.status, err.code, (err.headers or {}).get("Retry-After")) == (status, code, retry_after)
        body = json.loads(error_body(err))["error"]
        assert body["code"] == code and "nothing in this request was" in body["message"]
        if code == "not_owner":
            assert "another learner owns /state" in body["message"] and body["epoch"] == 3


def test_feedback_to_a_standby_learner_is_503_not_owner_until_it_takes_over(base_url, trained_store, tmp_path):
    """The whole feedback path on a real app whose learner is a standby: this test process holds
    the state_dir's ownership lease. Feedback gets 503 not_owner with Retry-After: 1 (nothing
    logged) while the replica stays ready; once the lease is free the learner takes over under a
    higher epoch and the same request is accepted."""
    import shutil

    from ray import serve

    from online_learning.persistence import Ownership, read_epoch
    from tests._helpers import deploy_online

    store, state = tmp_path / "store", tmp_path / "state"
    shutil.copytree(trained_store, store)
    holder = Ownership(state)
    assert holder.try_acquire()
    held_epoch = holder.epoch
    url = f"{base_url}/standby"
    event = {"event_id": "standby-1", "text": "turn on the kitchen light", "label": "HassTurnOn"}

    def send():
        return requests.post(f"{url}/v1/feedback", json=event, headers=AUTH, timeout=15)

    try:
        # A replica waits startup_sync_timeout_s for an owner, then serves the store's version.
        deploy_online(str(store), str(state), name="standby", classifier_replicas=1, startup_sync_timeout_s=2.0)
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="standby app ready")
        r = send()
        assert r.status_code == 503 and r.headers.get("Retry-After") == "1", r.text
        assert r.json()["error"]["code"] == "not_owner" and r.json()["error"]["epoch"] == held_epoch
        assert http_ok(f"{url}/healthz")  # a standby learner takes no serving replica out
        holder.release()

        def accepted():
            r = send()
            return r.status_code == 202 and r.json()

        body = wait_until(accepted, timeout=120, interval=0.5, what="feedback accepted after the takeover")
        assert body == {"accepted": 1, "duplicates": 0, "offsets": [0]}  # the refused request had logged nothing
        assert read_epoch(state) > held_epoch
    finally:
        holder.release()
        serve.delete("standby")
