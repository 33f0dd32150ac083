"""Server configuration: flag > SEQSERVE_* variable > default; bad values are one-line errors
naming the flag or the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.server.config import ConfigError, ServerConfig, parse_args


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


def test_worker_process_is_off_by_default_and_can_be_turned_on(tmp_path: Path) -> None:
    assert parse_args(["m"], environ={}).worker_process == "off"
    assert parse_args(["m", "--worker-process", "on"], environ={}).worker_process == "on"
    assert parse_args(["m"], environ={"SEQSERVE_WORKER_PROCESS": "on"}).worker_process == "on"
    with pytest.raises(ConfigError, match=r"worker_process \(--worker-process, SEQSERVE_WORKER_PROCESS\)"):
        ServerConfig(model_dir=tmp_path, worker_process="maybe")


def test_stream_interval_is_checked() -> None:
    assert parse_args(["m"], environ={}).stream_interval == 1
    assert parse_args(["m", "--stream-interval", "4"], environ={}).stream_interval == 4
    with pytest.raises(ConfigError, match=r"stream_interval \(--stream-interval, SEQSERVE_STREAM_INTERVAL\)"):
        parse_args(["m", "--stream-interval", "0"], environ={})
