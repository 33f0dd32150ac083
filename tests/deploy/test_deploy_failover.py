"""Scale-out without containers: three `seqserve serve` processes on loopback ports behind one
round-robin `Client` under load. One replica gets SIGKILL, another SIGTERM while a long call is in
flight on it. No call fails, every answer equals offline greedy decoding, the SIGTERMed replica
finishes its call and exits 0, and the container health probe (deploy/healthcheck.py) reports each
state (SERVING, NOT_SERVING while draining, unreachable once killed) with the right exit status.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from seqserve.client import Client
from seqserve.runtime.model_dir import open_model_dir
from seqserve.model.data import dates_pairs
from seqserve.runtime.tokenizer import encode_source, load_tokenizer
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0  # the bound on any one wait
MAX_NEW_TOKENS = 16
LOAD_THREADS = 6
GRACE_S = 40  # drain time: the pinned call below needs a few seconds on a busy 2-core machine
SEQSERVE = [sys.executable, "-m", "seqserve.server.cli", "serve"]


def load_probe() -> ModuleType:
    """deploy/healthcheck.py (a script, not a package module), imported by path."""
    spec = importlib.util.spec_from_file_location("seqserve_deploy_healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Replica:
    """One `seqserve serve` process on a free loopback port; its JSON log records are collected."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen([*SEQSERVE, str(model_dir), "--host", "127.0.0.1", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.records: list[dict] = []
        self.raw: list[str] = []
        self._new: queue.Queue[dict] = queue.Queue()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.records.append(record)
            self._new.put(record)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_event(self, event: str, timeout: float = TIMEOUT) -> dict:
        """The first log record with this `event` (fails the test if the process dies first)."""
        for record in self.records:
            if record.get("event") == event:
                return record
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = self._new.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self._new.empty():
                    pytest.fail(f"replica exited with {self.proc.returncode} before {event!r}:\n{''.join(self.raw)}")
                continue
            if record.get("event") == event:
                return record
        pytest.fail(f"no {event!r} log record within {timeout} s:\n{''.join(self.raw)}")

    def served(self, status: str = "OK", method: str = "Generate") -> int:
        """Calls of this method this replica logged with this status."""
        return sum(1 for r in list(self.records)
                   if r.get("event") == "request" and r.get("method") == method and r.get("status") == status)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


@dataclass
class Load:
    """Round-robin callers: each call asks for 1-3 inputs of the pool and checks every answer."""

    client: Client
    texts: list[str]
    expected: dict[str, tuple[int, ...]]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    answers: int = 0
    phase: str = "all three"
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, n: int) -> None:
        self.threads = [threading.Thread(target=self._caller, args=(seed,), daemon=True) for seed in range(n)]
        for thread in self.threads:
            thread.start()

    def _caller(self, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10_000):  # bounded even if `stop` were never set
            if self.stop.is_set():
                return
            batch = rng.sample(self.texts, rng.randint(1, 3))
            try:
                results = self.client.generate(batch, max_new_tokens=MAX_NEW_TOKENS, timeout=TIMEOUT)
            except Exception as exc:  # recorded, so the test reports every failure, not the first
                with self.lock:
                    self.calls += 1
                    self.failures.append(f"{type(exc).__name__}: {exc} (phase {self.phase})")
                continue
            with self.lock:
                self.calls += 1
                for text, result in zip(batch, results, strict=True):
                    self.answers += 1
                    if result.sequences[0].token_ids != self.expected[text]:
                        self.wrong.append(f"{text!r}: got {result.sequences[0].token_ids}, "
                                          f"offline greedy {self.expected[text]}")

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not reached within {timeout} s ({self.calls} calls, failures {self.failures[:3]})")
            if not any(t.is_alive() for t in self.threads):
                pytest.fail(f"{what}: every caller stopped ({self.failures[:3]})")
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "a caller is stuck"


@pytest.fixture
def replicas(model_dir: Path) -> Iterator[list[Replica]]:
    """Three replicas, started together; whichever still run at the end are killed."""
    # Four batch rows and one ONNX Runtime thread each: three processes share two cores, and a
    # 64-input call takes hundreds of steps, long enough to be caught in flight.
    started = [Replica(model_dir, "--max-batch-size", "4", "--max-queue", "1024", "--intra-op-threads", "1",
                       "--grace-period", str(GRACE_S))
               for _ in range(3)]
    try:
        for replica in started:
            replica.port = replica.wait_event("serving")["port"]
        yield started
    finally:
        for replica in started:
            replica.kill()


def offline_greedy(model_dir: Path, texts: list[str]) -> dict[str, tuple[int, ...]]:
    """What each input must come back as: the exported graphs' greedy decoding, in this process."""
    md = open_model_dir(model_dir)
    tokenizer = load_tokenizer(md.tokenizer_path)
    engine = OnnxSeq2Seq(md, device="cpu", intra_op_threads=1)
    ids = [encode_source(tokenizer, text)[: md.config.max_source_len] for text in texts]
    return {text: tuple(out) for text, out in zip(texts, greedy_generate(engine, ids, max_new_tokens=MAX_NEW_TOKENS))}


def test_round_robin_survives_sigkill_and_sigterm(model_dir: Path, replicas: list[Replica]) -> None:
    probe = load_probe()
    killed, drained, survivor = replicas
    texts = sorted({p.source for p in dates_pairs(80, seed=123)})
    expected = offline_greedy(model_dir, texts)
    for replica in replicas:  # the container probe: SERVING -> exit 0
        assert probe.main([replica.address, "--timeout", "5"]) == 0

    with Client([r.address for r in replicas], timeout=TIMEOUT) as client:
        load = Load(client, texts, expected)
        load.start(LOAD_THREADS)
        try:
            # 1. All three take calls (round-robin), then one dies without warning.
            load.wait_for(lambda: all(r.served() >= 5 for r in replicas), "every replica serving")
            load.phase = "SIGKILL"
            killed.proc.send_signal(signal.SIGKILL)
            assert killed.proc.wait(TIMEOUT) == -signal.SIGKILL
            assert probe.check(killed.address, timeout=2).startswith("UNREACHABLE")
            after_kill = load.answers
            load.wait_for(lambda: load.answers >= after_kill + 300, "load going on after SIGKILL")

            # 2. A long call pinned to the second replica, caught in flight (the process frozen so
            # nothing finishes between the check and the signal), then SIGTERM: it must complete.
            pinned_texts = [p.source for p in dates_pairs(256, seed=7)]
            pinned: dict[str, object] = {}

            def pinned_call() -> None:
                with Client(drained.address, timeout=TIMEOUT) as one:
                    try:
                        pinned["results"] = one.generate(pinned_texts, min_new_tokens=24, max_new_tokens=24)
                    except Exception as exc:
                        pinned["error"] = exc

            load.phase = "pinned call"
            pinned_thread = threading.Thread(target=pinned_call, daemon=True)
            before, infos = drained.served(), drained.served(method="GetModelInfo")
            pinned_thread.start()
            # The client asks the replica's input limit first; its Generate calls (256 inputs x 24
            # tokens over 4 batch rows: over 1,500 steps) follow at once and take far longer than this.
            load.wait_for(lambda: drained.served(method="GetModelInfo") > infos, "the pinned call's GetModelInfo")
            time.sleep(0.1)
            load.phase = "SIGSTOP/SIGTERM"
            os.kill(drained.proc.pid, signal.SIGSTOP)
            try:
                assert pinned_thread.is_alive(), f"the pinned call finished before SIGTERM: {pinned}"
                os.kill(drained.proc.pid, signal.SIGTERM)
            finally:
                os.kill(drained.proc.pid, signal.SIGCONT)
            draining = drained.wait_event("draining")
            assert probe.main([drained.address, "--timeout", "2"]) == 1  # NOT_SERVING (or gone): not healthy
            sigterm_at = time.monotonic()
            pinned_thread.join(GRACE_S + 5)
            assert "error" not in pinned, f"the call in flight at SIGTERM failed: {pinned.get('error')}"
            assert [len(r.sequences[0].token_ids) for r in pinned["results"]] == [24] * 256  # type: ignore[attr-defined]
            assert drained.proc.wait(GRACE_S + 5) == 0
            drain_s = time.monotonic() - sigterm_at
            assert drained.wait_event("stopped")["drained"] is True
            assert draining["in_flight"] >= 1

            # 3. The survivor carries the load alone.
            load.phase = "survivor alone"
            after_drain, survivor_before = load.answers, survivor.served()
            load.wait_for(lambda: load.answers >= after_drain + 300, "load going on after SIGTERM")
        finally:
            load.finish()

    not_ok = [r for replica in replicas for r in replica.records if r.get("event") == "request" and r.get("status") != "OK"]
    assert not load.failures, f"{len(load.failures)} of {load.calls} calls failed: {load.failures[:5]}; not OK on the servers: {not_ok}"
    assert not load.wrong, f"{len(load.wrong)} of {load.answers} answers differ from offline greedy: {load.wrong[:5]}"
    assert load.answers >= 700
    assert survivor.served() > survivor_before
    assert drained.served() >= before + 8  # the pinned call's eight 32-input Generate calls (and the load's)
    print(f"\n{load.calls} calls, {load.answers} answers, 0 failed; OK per replica: "
          f"killed {killed.served()}, drained {drained.served()} (+{drained.served('UNAVAILABLE')} refused while "
          f"draining, retried elsewhere; {draining['in_flight']} in flight at SIGTERM, drained in {drain_s:.1f} s), "
          f"survivor {survivor.served()}")

    survivor.proc.send_signal(signal.SIGTERM)
    assert survivor.proc.wait(TIMEOUT) == 0


def test_probe_asks_the_local_server_on_its_configured_port() -> None:
    probe = load_probe()
    assert probe.default_address({}) == "127.0.0.1:50051"
    assert probe.default_address({"SEQSERVE_PORT": "6000"}) == "127.0.0.1:6000"
    assert probe.default_address({"SEQSERVE_PORT": "6000", "SEQSERVE_HEALTHCHECK_ADDRESS": "[::1]:7000"}) == "[::1]:7000"
    # Nothing listening: unhealthy, with the reason on one line, quickly.
    started = time.monotonic()
    assert probe.check("127.0.0.1:1", timeout=2).startswith("UNREACHABLE: UNAVAILABLE")
    assert time.monotonic() - started < 5
