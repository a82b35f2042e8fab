"""Serving, in-process: the KServe v2 codec (JSON and binary tensors, malformed bodies refused
by name), the worker registry's bans and their backoff, and blocks spread over workers so that any
one worker can go."""
import numpy as np
import pytest

from anyorder.serving import protocol
from anyorder.serving.cluster import assign_blocks
from anyorder.serving.router import WorkerRegistry


@pytest.mark.parametrize("binary", [True, False])
def test_v2_tensors_round_trip_in_json_and_binary(binary):
    tensors = {"tokens": np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32),
               "slot": np.array([2], np.int64)}
    body, headers = protocol.encode_request(tensors, ["tokens_out"], binary=binary)
    assert (protocol.HEADER_LENGTH in headers) == binary
    message, decoded = protocol.decode_request(body, headers.get(protocol.HEADER_LENGTH))
    assert protocol.wants_binary(message, "tokens_out") == binary
    for name, array in tensors.items():
        assert decoded[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded[name], array)


SHORT = b'{"inputs":[{"name":"t","datatype":"FP32","shape":[2],"parameters":' \
        b'{"binary_data_size":8}}]}'


@pytest.mark.parametrize("body,header,message", [
    (b'{"inputs": []}', None, "non-empty list"),
    (b'not json', None, "not valid JSON"),
    (SHORT + b"\x00" * 4, str(len(SHORT)), "ends after 4 bytes"),
    (SHORT + b"\x00" * 12, str(len(SHORT)), "4 bytes that belong to no tensor"),
    (b'{"inputs":[{"name":"t","datatype":"FP32","shape":[1]}]}', "999", "must give the length"),
    (b'{"inputs":[{"name":"t","datatype":"FP32","shape":[1]}]}', "x", "not an integer"),
    (b'{"inputs":[{"name":"t","datatype":"FP32","shape":[2],"data":[1]}]}', None,
     "has 1 elements"),
    (b'{"inputs":[{"name":"t","datatype":"STRING","shape":[1],"data":[1]}]}', None,
     "not supported"),
    (b'{"inputs":[{"name":"t","datatype":"FP32","shape":[-1],"data":[1]}]}', None,
     "non-negative"),
])
def test_malformed_v2_bodies_are_refused_by_name(body, header, message):
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode_request(body, header)


def test_bans_double_up_to_the_cap_and_only_a_probe_lifts_them():
    now = [100.0]
    registry = WorkerRegistry(depth=4, ban_base_s=0.5, ban_max_s=2.0, clock=lambda: now[0])
    worker = registry.announce("http://w", [0, 1], ttl_s=10)
    lengths = []
    for _ in range(4):
        registry.ban(worker, "timeout")
        registry.ban(worker, "a second request in flight")  # does not lengthen the ban
        lengths.append(worker.banned_until - now[0])
        assert registry.hosts(0) == []
        now[0] = worker.banned_until
        assert registry.due_for_probe() == [worker] and registry.hosts(0) == []
        registry.readmit(worker)
        assert registry.hosts(0) == [worker]
    assert lengths == [0.5, 1.0, 2.0, 2.0]
    registry.succeeded(worker, 0.01)
    registry.ban(worker, "again")
    assert worker.banned_until - now[0] == 0.5  # a success resets the backoff
    now[0] += 11  # past the announcement's TTL without a heartbeat
    assert registry.expire() == ["http://w"] and registry.workers == {}


def test_blocks_are_spread_so_any_one_worker_can_go():
    hosted = assign_blocks(depth=8, workers=4, replicas=2)
    for block in range(8):
        assert sum(block in blocks for blocks in hosted) == 2
    for gone in range(4):
        assert set().union(*(hosted[w] for w in range(4) if w != gone)) == set(range(8))
