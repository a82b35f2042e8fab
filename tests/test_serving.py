"""Serving with real processes on 127.0.0.1: block workers killed, stopped and lying mid-stream
behind the router; `tritonclient` against our worker; the HTTP service refusing bad input and
serving on; the export laid out as a Triton repository. Every loop is bounded in count and time.
The codec and the worker registry, in-process, are in test_serving_protocol.py."""
import asyncio
import os
import signal
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from anyorder.export.blocks import export_model
from anyorder.export.runtime import BlockRuntime
from anyorder.serving import protocol
from anyorder.serving.cluster import launch
from anyorder.serving.router import Router

from conftest import tiny_model
from data_fixtures import png

DEPTH = 4
WORKER = [sys.executable, "-m", "anyorder.serving.worker"]
SERVICE = [sys.executable, "-m", "anyorder.serving.service"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model("ls", depth=DEPTH, seed=3).eval()
    out = tmp_path_factory.mktemp("serving") / "export"
    export_model(model, out, "tiny")
    return model, out


@pytest.fixture(scope="module")
def test_images(digits16):
    images, labels = digits16["test"]
    return images[:64], labels[:64]


def stop(*processes):
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait(timeout=10)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def torch_logits(model, runtime, images, order):
    with torch.no_grad():
        return model(torch.from_numpy(runtime.preprocess(images)), order).numpy()


def v2_request(images, **parameters):
    return protocol.encode_request({"images": images}, ["logits"], binary=True,
                                   parameters=parameters)


# -- a cluster of real processes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(exported):
    """The service (router backend) and four workers: w0 {0,1} (to be killed, then restarted),
    w1 {1,2} (to be stopped), w2 {2,3} (answers NaN), w3 {3,0} (healthy)."""
    _, out = exported
    service, url = launch(SERVICE + [str(out), "--cluster", "--port", "0", "--threads", "1",
                                     "--hop-timeout-ms", "300", "--ban-base-ms", "200",
                                     "--ban-max-s", "1", "--probe-interval-ms", "200"])
    blocks = {"w0": "0,1", "w1": "1,2", "w2": "2,3", "w3": "3,0"}
    chaos = {"w2": ["--garbage-rate", "1", "--garbage", "nan"]}
    workers, urls = {}, {}
    try:
        for name, hosted in blocks.items():
            workers[name], urls[name] = launch(
                WORKER + [str(out), "--blocks", hosted, "--port", "0", "--router", url,
                          "--heartbeat", "0.3"] + chaos.get(name, []))
        client = httpx.Client(base_url=url, timeout=30)
        wait_for(lambda: len(client.get("/router/workers").json()["workers"]) == 4, 20,
                 "four workers announced")
        yield {"url": url, "client": client, "workers": workers, "urls": urls, "out": out,
               "service": service}
    finally:
        stop(service, *workers.values())


def send_through_failures(cluster, images, deadline_s: float, requests: int) -> dict:
    """`requests` v2 requests of 8 images in random orders, four in flight at a time; after request
    7, w0 is killed and w1 stopped. {index: (response, seconds the client waited, first image)}."""
    workers = cluster["workers"]
    results: dict = {}

    def send(index: int):
        start = (index * 8) % len(images)
        body, headers = v2_request(images[start:start + 8], order="random", seed=index,
                                   deadline_ms=deadline_s * 1e3)
        began = time.monotonic()
        with httpx.Client(base_url=cluster["url"], timeout=30) as own:
            response = own.post("/v2/models/tiny/infer", content=body, headers=headers)
        results[index] = (response, time.monotonic() - began, start)
        if index == 7:  # mid-stream: one worker dies, one hangs
            os.kill(workers["w0"].pid, signal.SIGKILL)
            os.kill(workers["w1"].pid, signal.SIGSTOP)

    for group in range(0, requests, 4):  # four requests in flight at a time
        threads = [threading.Thread(target=send, args=(index,))
                   for index in range(group, group + 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    return results


def check_answers_match_pytorch(results, urls, model, runtime, test_images, deadline_s: float,
                                requests: int) -> None:
    images, labels = test_images
    assert sorted(results) == list(range(requests))
    correct_served = correct_torch = 0
    for index, (response, elapsed, start) in sorted(results.items()):
        assert response.status_code == 200, response.text
        # Timed by the client: connecting, sending and reading included.
        assert elapsed <= deadline_s, f"request {index} took {elapsed:.2f} s"
        _, outputs = protocol.decode_response(response.content,
                                              response.headers.get(protocol.HEADER_LENGTH))
        report = _report(response)
        executed, hosts = report["executed_order"], report["hosts"]
        assert sorted(executed + report["skipped"]) == list(range(DEPTH))
        assert urls["w2"] not in hosts  # NaN is never passed on
        if index >= 8:  # sent after the kill: the dead and the hung worker serve nothing
            assert urls["w0"] not in hosts and urls["w1"] not in hosts, report
        # Blocks 0 and 3 have a healthy host (w3): a failing host is retried, never skipped.
        assert {0, 3} <= set(executed), report
        batch, truth = images[start:start + 8], labels[start:start + 8]
        expected = torch_logits(model, runtime, batch, executed)
        np.testing.assert_allclose(outputs["logits"], expected, atol=1e-4)
        correct_served += int(np.sum(outputs["logits"].argmax(1) == truth))
        correct_torch += int(np.sum(expected.argmax(1) == truth))
    assert correct_served == correct_torch  # the accuracy with blocks down, served = PyTorch
    skipped_late = [set(_report(results[i][0])["skipped"]) for i in range(12, requests)]
    assert all(skipped == {1, 2} for skipped in skipped_late)  # 1: killed+hung, 2: hung+lying


def check_missing_blocks_refused_by_policy(client, images) -> None:
    """Under `fail` a missing block is a clean 503 (known before compute); min_blocks likewise."""
    body, headers = v2_request(images[:2], order="sequential", policy="fail")
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 503 and "missing" in response.json()["error"]
    body, headers = v2_request(images[:2], order="sequential", policy="min_blocks:4")
    assert client.post("/v2/models/tiny/infer", content=body, headers=headers).status_code == 503
    body, headers = v2_request(images[:2], order="sequential", policy="min_blocks:2")
    assert client.post("/v2/models/tiny/infer", content=body, headers=headers).status_code == 200


def check_restarted_worker_is_routed_to(cluster, images) -> None:
    """The killed worker comes back on its port and is used again."""
    client, urls, workers = cluster["client"], cluster["urls"], cluster["workers"]
    port = urls["w0"].rsplit(":", 1)[1]
    workers["w0"], _ = launch(WORKER + [str(cluster["out"]), "--blocks", "0,1", "--port", port,
                                        "--router", cluster["url"], "--heartbeat", "0.3"])

    def used_again():
        body, headers = v2_request(images[:1], order="sequential")
        response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
        return response.status_code == 200 and urls["w0"] in _report(response)["hosts"]
    wait_for(used_again, 15, "the restarted worker is routed to")
    workers_view = {w["url"]: w for w in client.get("/router/workers").json()["workers"]}
    assert workers_view[urls["w0"]]["state"] == "live"
    assert workers_view[urls["w2"]]["last_error"].startswith("bad answer")
    metrics = client.get("/metrics").text
    assert 'anyorder_hops_total{outcome="failed"}' in metrics
    assert 'anyorder_blocks_skipped_total{why="unavailable"}' in metrics


def test_a_cluster_answers_like_pytorch_through_killed_stopped_and_lying_workers(
        cluster, exported, test_images):
    model, out = exported
    runtime = BlockRuntime(out)
    images, _ = test_images
    deadline_s, requests = 2.5, 40
    results = send_through_failures(cluster, images, deadline_s, requests)
    check_answers_match_pytorch(results, cluster["urls"], model, runtime, test_images, deadline_s,
                                requests)
    check_missing_blocks_refused_by_policy(cluster["client"], images)
    check_restarted_worker_is_routed_to(cluster, images)


def _report(response) -> dict:
    import json
    message, _ = protocol.decode_response(response.content,
                                          response.headers.get(protocol.HEADER_LENGTH))
    return {k: json.loads(v) for k, v in message["parameters"].items()}


# -- tritonclient against our worker --------------------------------------------------------------

@pytest.fixture(scope="module")
def lone_worker(exported):
    _, out = exported
    process, url = launch(WORKER + [str(out), "--port", "0"])
    try:
        yield url
    finally:
        stop(process)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_gets_what_our_router_gets(exported, lone_worker, binary):
    import tritonclient.http as triton

    _, out = exported
    tokens = np.random.default_rng(1).normal(size=(3, 17, 32)).astype(np.float32)
    client = triton.InferenceServerClient(lone_worker.split("//")[1])
    assert client.is_server_ready() and client.is_model_ready("block_02")
    metadata = client.get_model_metadata("block_02")
    assert metadata["inputs"][0]["shape"] == [-1, 17, 32]
    request = triton.InferInput("tokens", list(tokens.shape), "FP32")
    request.set_data_from_numpy(tokens, binary_data=binary)
    answer = client.infer("block_02", [request],
                          outputs=[triton.InferRequestedOutput("tokens_out", binary_data=binary)])
    from_triton = answer.as_numpy("tokens_out")

    async def through_router():
        router = Router(out, workers=[lone_worker])
        await router.start()
        try:
            assert router.registry.workers[lone_worker].blocks == frozenset(range(DEPTH))
            return await router.hop(lone_worker, 2, tokens, 0, 5.0)
        finally:
            await router.close()
    from_router = asyncio.run(through_router())
    np.testing.assert_array_equal(from_triton, from_router)
    direct = BlockRuntime(out).blocks[2].run(None, {"tokens": tokens})[0]
    np.testing.assert_allclose(from_router, direct, atol=1e-6)


# -- the HTTP service, in-process backend ----------------------------------------------------------

@pytest.fixture(scope="module")
def service(exported):
    _, out = exported
    process, url = launch(SERVICE + [str(out), "--port", "0", "--threads", "1",
                                     "--max-body-mb", "0.25", "--max-images", "8"])
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        stop(process)


def test_the_service_predicts_uploads_like_the_runtime(service, exported, test_images):
    _, out = exported
    images, _ = test_images
    files = [("images", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images[:5])]
    response = service.post("/v1/models/tiny/predict", files=files,
                            params={"order": "2,0,3", "exclude": "3"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["executed_order"] == [2, 0] and answer["skipped"] == [3]
    assert answer["skipped_why"] == {"3": "excluded by the caller"}
    expected = BlockRuntime(out).predict(images[:5], [2, 0])
    np.testing.assert_allclose(answer["logits"], expected.logits, atol=1e-5)
    assert [p["index"] for p in answer["predictions"]] == expected.predictions.tolist()
    metadata = service.get("/v1/models/tiny").json()
    assert metadata["available_blocks"] == list(range(DEPTH))
    assert metadata["manifest"]["name"] == "tiny"


def test_bad_input_is_a_clear_4xx_and_the_service_serves_on(service, test_images):
    images, _ = test_images
    good = [("images", ("ok.png", png(images[0]), "image/png"))]
    cases = {
        "not an image": (415, dict(files=[("images", ("a.png", b"hello", "image/png"))])),
        "wrong size": (422, dict(files=[("images", ("big.png", png(np.zeros((20, 20, 3),
                                                                           np.uint8)),
                                                    "image/png"))])),
        "wrong channels": (422, dict(files=[("images", ("gray.png", png(images[0][..., 0]),
                                                        "image/png"))])),
        "too large": (413, dict(files=[("images", ("huge.png", os.urandom(300_000),
                                                   "image/png"))])),
        "too many images": (400, dict(files=good * 9)),
        "bad option": (400, dict(files=good, params={"policy": "sometimes"})),
        "unknown option": (400, dict(files=good, params={"colour": "blue"})),
        "not multipart": (415, dict(content=b"raw")),
    }
    for what, (status, request) in cases.items():
        response = service.post("/v1/models/tiny/predict", **request)
        assert response.status_code == status, (what, response.text)
        assert response.json()["error"], what
    assert service.post("/v1/models/nope/predict", files=good).status_code == 404
    body, headers = v2_request(images[:2])
    for broken, expected in [({**headers, protocol.HEADER_LENGTH: "99999"}, "must give"),
                             ({**headers, protocol.HEADER_LENGTH: "12"}, "not valid JSON")]:
        response = service.post("/v2/models/tiny/infer", content=body, headers=broken)
        assert response.status_code == 400 and expected in response.json()["error"]
    wrong = protocol.encode_request({"images": images[:2, :8]}, binary=True)
    response = service.post("/v2/models/tiny/infer", content=wrong[0], headers=wrong[1])
    assert response.status_code == 400 and "UINT8 (N, 16, 16, 3)" in response.json()["error"]

    # ...and it still serves: ready, and a good request answers.
    assert service.get("/health/ready").status_code == 200
    assert service.post("/v1/models/tiny/predict", files=good).status_code == 200
    response = service.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 200 and _report(response)["executed_order"] == [0, 1, 2, 3]
    metrics = service.get("/metrics").text
    assert 'anyorder_requests_total{route="/v1/models/{model}/predict",status="415"} 2.0' in metrics
    assert 'status="413"' in metrics


# -- a Triton model repository from the export ------------------------------------------------------

def test_the_blocks_lay_out_as_a_triton_repository(exported, tmp_path):
    from anyorder.files import sha256_file
    from anyorder.export.runtime import ExportError, read_manifest
    from anyorder.serving.triton import main, write_triton_repository

    _, out = exported
    manifest = read_manifest(out)
    names = write_triton_repository(out, tmp_path / "repo", blocks=[2, 0])
    assert names == ["block_00", "block_02"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == names
    for entry in manifest["graphs"]["blocks"]:
        model = tmp_path / "repo" / f"block_{entry['index']:02d}" / "1" / "model.onnx"
        assert model.is_file() == (entry["index"] in (0, 2))
        if model.is_file():
            assert sha256_file(model) == entry["sha256"]
    config = (tmp_path / "repo" / "block_02" / "config.pbtxt").read_text()
    assert 'name: "block_02"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "dims: [ -1, 17, 32 ]" in config and "slot" not in config
    with pytest.raises(ExportError, match="already exists"):
        write_triton_repository(out, tmp_path / "repo")

    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree(out, damaged)
    (damaged / "block_01.onnx").write_bytes(b"changed")
    assert main([str(damaged), str(tmp_path / "repo2")]) == 2
    assert not (tmp_path / "repo2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo2")] == []
