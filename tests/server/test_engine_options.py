"""What the engine asks of ONNX Runtime's sessions: spin-waiting threads for the decoder (always,
only within a step, or never), and an encoder whose threads stop spinning once its run returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.runtime.errors import SeqserveError
from seqserve.runtime.engine import OnnxSeq2Seq
from seqserve.server.testing import InProcessServer, loopback_config

SPIN = "session.intra_op.allow_spinning"
STOP = "session.force_spinning_stop"


@pytest.mark.parametrize("spinning", [True, False])
def test_spinning_reaches_both_sessions(model_dir: Path, spinning: bool) -> None:
    engine = OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=2, spinning=spinning)
    decoder, encoder = engine.decoder.get_session_options(), engine.encoder.get_session_options()
    assert decoder.get_session_config_entry(SPIN) == encoder.get_session_config_entry(SPIN) == str(int(spinning))
    # The decoder runs back to back, so its threads keep spinning between steps; the encoder
    # runs once per admission and must not keep a core busy after it.
    assert encoder.get_session_config_entry(STOP) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        decoder.get_session_config_entry(STOP)


def test_spinning_within_a_step_only_parks_the_decoder_threads_after_each_run(model_dir: Path) -> None:
    engine = OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=2, spinning="run")
    decoder = engine.decoder.get_session_options()
    assert decoder.get_session_config_entry(SPIN) == "1" and decoder.get_session_config_entry(STOP) == "1"
    with pytest.raises(SeqserveError, match="spinning must be one of on, run, off"):
        OnnxSeq2Seq(model_dir, device="cpu", spinning="sometimes")


def test_server_flag_reaches_the_decoder(model_dir: Path) -> None:
    with InProcessServer(loopback_config(model_dir, intra_op_spinning="off")) as server:
        engine = server.scheduler.engine
        assert isinstance(engine, OnnxSeq2Seq)
        assert engine.decoder.get_session_options().get_session_config_entry(SPIN) == "0"
