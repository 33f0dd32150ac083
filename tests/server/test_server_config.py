"""Server configuration: flag > SEQSERVE_* variable > default; bad values are one-line errors
naming the flag or the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.runtime import cores as cores_module
from seqserve.server.service import stream_interval
from seqserve.server.config import (ConfigError, ServerConfig, available_cores, describe_layout, parse_args,
                                    resolve_layout)


def test_defaults() -> None:
    config = parse_args(["models/m"], environ={})
    assert config.model_dir == Path("models/m") and config.port == 50051 and config.device == "auto"
    assert config.max_beams == 8 and config.max_return_sequences == 8  # 0 = min(8, max_batch_size)
    assert config.address == "[::]:50051"


def test_flag_beats_environment_beats_default() -> None:
    env = {"SEQSERVE_PORT": "6000", "SEQSERVE_MAX_QUEUE": "7", "SEQSERVE_GRACE_PERIOD": "2.5",
           "SEQSERVE_MODEL_DIR": "from-env", "SEQSERVE_DEVICE": "cpu"}
    config = parse_args(["--port", "7000"], environ=env)
    assert config.port == 7000 and config.max_queue == 7 and config.grace_period_s == 2.5
    assert config.model_dir == Path("from-env") and config.device == "cpu"
    assert parse_args(["flag-dir"], environ=env).model_dir == Path("flag-dir")


def test_small_batch_caps_beams_and_samples() -> None:
    config = parse_args(["m", "--max-batch-size", "2"], environ={})
    assert config.max_beams == 2 and config.max_return_sequences == 2


@pytest.mark.parametrize("env, expected", [
    ({"SEQSERVE_PORT": "abc"}, "SEQSERVE_PORT='abc': expected an integer"),
    ({"SEQSERVE_GRACE_PERIOD": "soon"}, "SEQSERVE_GRACE_PERIOD='soon': expected a number"),
    ({"SEQSERVE_DEVICE": "tpu"}, "SEQSERVE_DEVICE='tpu': expected one of auto, cpu, cuda"),
    ({"SEQSERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size (--max-batch-size, SEQSERVE_MAX_BATCH_SIZE) must be >= 1"),
    ({"SEQSERVE_PORT": "70000"}, "port (--port, SEQSERVE_PORT) must be in 0..65535"),
])
def test_bad_environment_values_are_one_line_errors(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(["m"], environ=env)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"max_beams \(--max-beams, SEQSERVE_MAX_BEAMS\) must be in 1..max_batch_size"):
        ServerConfig(model_dir="m", max_batch_size=4, max_beams=5)
    with pytest.raises(SystemExit):  # argparse's own message for a malformed flag
        parse_args(["m", "--port", "x"], environ={})


def test_model_dir_is_required() -> None:
    with pytest.raises(SystemExit):
        parse_args([], environ={})


def test_ipv6_host_is_bracketed() -> None:
    assert ServerConfig(model_dir="m", host="::1", port=5).address == "[::1]:5"
    assert ServerConfig(model_dir="m", host="127.0.0.1", port=5).address == "127.0.0.1:5"


def test_tls_settings_go_together(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="tls_key"):
        ServerConfig(model_dir=tmp_path, tls_cert="server.pem")
    with pytest.raises(ConfigError, match="tls_client_ca"):
        ServerConfig(model_dir=tmp_path, tls_client_ca="ca.pem")
    assert ServerConfig(model_dir=tmp_path, tls_cert="a.pem", tls_key="a.key").tls_cert == "a.pem"


def test_intra_op_spinning_is_on_by_default_and_can_be_turned_off() -> None:
    assert parse_args(["m"], environ={}).intra_op_spinning == "on"
    assert parse_args(["m", "--intra-op-spinning", "off"], environ={}).intra_op_spinning == "off"
    assert parse_args(["m"], environ={"SEQSERVE_INTRA_OP_SPINNING": "off"}).intra_op_spinning == "off"
    assert parse_args(["m", "--intra-op-spinning", "run"], environ={}).intra_op_spinning == "run"
    with pytest.raises(ConfigError, match="SEQSERVE_INTRA_OP_SPINNING='sometimes'"):
        parse_args(["m"], environ={"SEQSERVE_INTRA_OP_SPINNING": "sometimes"})


def test_the_engine_core_is_a_process_by_default_and_can_be_a_thread(tmp_path: Path) -> None:
    assert parse_args(["m"], environ={}).engine_core == "process"
    assert parse_args(["m", "--engine-core", "thread"], environ={}).engine_core == "thread"
    assert parse_args(["m"], environ={"SEQSERVE_ENGINE_CORE": "thread"}).engine_core == "thread"
    with pytest.raises(ConfigError, match=r"engine_core \(--engine-core, SEQSERVE_ENGINE_CORE\)"):
        ServerConfig(model_dir=tmp_path, engine_core="maybe")


def test_frontends_is_auto_or_a_number_and_needs_the_engine_core_process(tmp_path: Path) -> None:
    assert parse_args(["m"], environ={}).frontends == "auto"
    assert parse_args(["m", "--frontends", "3"], environ={}).frontends == "3"
    for bad in ("0", "-1", "two", "65"):
        with pytest.raises(ConfigError, match=r"frontends \(--frontends, SEQSERVE_FRONTENDS\) must be auto or"):
            ServerConfig(model_dir=tmp_path, frontends=bad)
    with pytest.raises(ConfigError, match="needs --engine-core process"):
        ServerConfig(model_dir=tmp_path, frontends="2", engine_core="thread")


@pytest.mark.parametrize(("cores", "gpu", "frontends", "threads"), [
    (1, False, 1, 1), (2, False, 1, 1), (3, False, 1, 2), (4, False, 1, 3), (8, False, 2, 6), (16, False, 4, 12),
    (64, False, 8, 56), (8, True, 6, 2), (16, True, 8, 8),
])
def test_the_layout_splits_the_cores_between_front_ends_and_the_engine(tmp_path: Path, cores: int, gpu: bool,
                                                                       frontends: int, threads: int) -> None:
    config = resolve_layout(ServerConfig(model_dir=tmp_path), cores, gpu=gpu)
    assert (config.frontends, config.intra_op_threads, config.cores) == (str(frontends), threads, cores)
    assert f"{cores} cores" in describe_layout(config) and f"{frontends} gRPC front-end" in describe_layout(config)


def test_the_layout_keeps_what_the_user_set(tmp_path: Path) -> None:
    config = resolve_layout(ServerConfig(model_dir=tmp_path, frontends="3", intra_op_threads=5), 8)
    assert (config.frontends, config.intra_op_threads) == ("3", 5)
    thread = resolve_layout(ServerConfig(model_dir=tmp_path, engine_core="thread"), 8)
    assert (thread.frontends, thread.intra_op_threads) == ("1", 8)  # one process: every core decodes


def test_available_cores_follow_the_affinity_and_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(cores_module, "cgroup_quota", lambda: None)
    assert available_cores() == 6
    monkeypatch.setattr(cores_module, "cgroup_quota", lambda: 2.5)  # --cpus 2.5
    assert available_cores() == 3
    monkeypatch.setattr(cores_module, "cgroup_quota", lambda: 0.2)
    assert available_cores() == 1


def test_stream_interval_is_checked() -> None:
    assert parse_args(["m"], environ={}).stream_interval == 0  # auto
    assert parse_args(["m", "--stream-interval", "4"], environ={}).stream_interval == 4
    with pytest.raises(ConfigError, match=r"stream_interval \(--stream-interval, SEQSERVE_STREAM_INTERVAL\)"):
        parse_args(["m", "--stream-interval", "-1"], environ={})


def test_the_auto_stream_interval_grows_with_the_open_streams() -> None:
    assert [stream_interval(0, n) for n in (1, 15, 16, 31, 32, 48, 64, 1000)] == [1, 1, 2, 2, 3, 4, 4, 4]
    assert [stream_interval(3, n) for n in (1, 1000)] == [3, 3]  # as configured, whatever the load
