"""Two real server processes behind one client (round-robin): killing one mid-run fails no call,
because calls that hit the dead replica end UNAVAILABLE and the retry policy sends them to the other."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

from seqserve.client import Client, SeqserveClientError
from seqserve.model.data import dates_pairs

INPUTS = [p.source for p in dates_pairs(200, seed=11)]


def served_requests(log: Path) -> int:
    """Calls a replica answered, from its request log lines."""
    count = 0
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        count += record.get("event") == "request" and record.get("method") == "Generate"
    return count


def test_round_robin_over_two_replicas_survives_killing_one(server_process) -> None:
    first, second = server_process(), server_process()
    first.wait_serving()
    second.wait_serving()
    results: Counter[str] = Counter()
    failures: list[str] = []
    killed = threading.Event()
    after_kill = Counter()
    stop = time.monotonic() + 30  # a hard bound; the loop below ends far sooner

    with Client([first.address, second.address], timeout=10) as client:
        assert client.target.startswith("ipv4:")

        def caller(offset: int) -> None:
            for i in range(offset, offset + 10_000):
                if time.monotonic() > stop or (killed.is_set() and after_kill["calls"] >= 150):
                    return
                try:
                    result = client.generate(INPUTS[i % len(INPUTS)])
                    results["ok"] += 1
                    if killed.is_set():
                        after_kill["calls"] += 1
                    assert result.text
                except SeqserveClientError as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=caller, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while results["ok"] < 100 and time.monotonic() < deadline:  # both replicas busy
            time.sleep(0.01)
        first.kill()  # SIGKILL: no draining, connections just drop
        killed.set()
        for t in threads:
            t.join(40)

    assert not failures, failures[:5]
    assert after_kill["calls"] >= 150, after_kill  # calls went on, all on the survivor
    # Round-robin: before the kill both replicas were answering.
    assert served_requests(first.log_path) > 10 and served_requests(second.log_path) > 10
