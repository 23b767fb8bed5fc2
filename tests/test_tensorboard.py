"""What a run leaves for TensorBoard and in its log: a run named by its overrides, one tag per quantity,
the HParams tab filled, and the console's words kept in train.log."""

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lowbw.metrics.tensorboard import hparams_of, run_name

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.steps=3",
        "train.batch_size=4", "pipeline.stages=2", "pipeline.microbatches=2", "train.eval_batches=1",
        "train.eval_interval=0"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    out = subprocess.run([sys.executable, "-m", "lowbw.train", *TINY, "schedule=gpipe", "net=home", "progress=false",
                          f"out_dir={run_dir}"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def _events(run_dir):
    [logdir] = [p for p in (run_dir / "tb").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return logdir.name, acc


def test_a_run_is_named_in_tensorboard_by_what_it_overrode(cli_run):
    run_dir, _ = cli_run
    name, _ = _events(run_dir)
    assert "model.n_layer=2," in name and "schedule=gpipe" in name and "net=home" in name
    assert "out_dir" not in name and "progress" not in name  # settings that change no result


def test_throughput_has_one_tag_whatever_the_clock(cli_run):
    _, acc = _events(cli_run[0])
    tags = set(acc.Tags()["scalars"])
    assert {"perf/tokens_per_s", "perf/step_time_s", "perf/step_time_wall_s", "train/loss"} <= tags
    assert not [t for t in tags if t.endswith("_virtual") or t == "perf/tokens_per_s_wall"]
    assert len(acc.Scalars("train/loss")) == 3


def test_hparams_tab_holds_the_settings_and_the_final_metrics(cli_run):
    _, acc = _events(cli_run[0])
    meta = acc.summary_metadata  # tag -> SummaryMetadata of every summary written
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(m.plugin_data.content)
            for tag, m in meta.items() if m.plugin_data.plugin_name == "hparams"}
    start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    assert start.hparams["clock.name"].string_value == "virtual"
    assert start.hparams["schedule.name"].string_value == "gpipe"
    assert start.hparams["model.n_embd"].number_value == 32
    assert start.hparams["status"].string_value == "completed"
    exp = next(d.experiment for d in data.values() if d.HasField("experiment"))
    metrics = {m.name.tag for m in exp.metric_infos}
    assert {"final/tokens_per_s", "final/bytes_per_token", "final/bubble_fraction", "final/val_loss",
            "final/j_per_token"} <= metrics
    assert metrics <= set(acc.Tags()["scalars"])  # each column links to a curve of this run


def test_train_log_keeps_what_the_console_said(cli_run):
    run_dir, out = cli_run
    log = (run_dir / "train.log").read_text()
    assert "lowbw run completed: 3/3 steps" in log and "lowbw run completed" in out.stdout
    assert "[INFO]" in log  # time-stamped in the file, plain on the console
    assert "[INFO]" not in out.stdout


def test_run_names_are_safe_folder_names():
    assert run_name("") == "defaults"
    assert run_name("compress/fwd=int8,net=home") == "compress.fwd=int8,net=home"
    long = run_name(",".join(f"model.n_layer{i}={i}" for i in range(40)))
    assert len(long) <= 200 and long != run_name(",".join(f"model.n_layer{i}={i}" for i in range(41)))


def test_every_config_leaf_becomes_an_hparam_tensorboard_accepts():
    hp = hparams_of({"out_dir": "/x", "net": {"name": "home", "regions": [1, 2], "x": None}, "seed": 3})
    assert hp == {"net.name": "home", "net.regions": "[1, 2]", "net.x": "None", "seed": 3}


def test_time_and_joules_to_the_target_loss_are_hparams_columns():
    from lowbw.metrics.tensorboard import final_metrics

    summary = {"tokens_per_s": 10.0, "val_loss": None, "energy": {"j_per_token": 0.5},
               "target": {"best_val_loss": 1.9, "first_crossing": {"time_s": 7.0, "energy_j": 3.0, "tokens": 64},
                          "interpolated": {"time_s": 6.5, "energy_j": 2.8, "tokens": 60}}}
    m = final_metrics(summary)
    assert m == {"final/tokens_per_s": 10.0, "final/j_per_token": 0.5, "final/best_val_loss": 1.9,
                 "final/target_time_s": 6.5, "final/target_energy_j": 2.8, "final/target_tokens": 60.0}
    assert "final/target_time_s" not in final_metrics({"target": {"best_val_loss": 2.5, "first_crossing": None}})


def test_a_failed_tensorboard_write_reaches_the_caller_without_a_thread_traceback(tmp_path, capfd, monkeypatch):
    import errno
    import threading

    from lowbw.metrics.tensorboard import TensorBoardLog

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's, as in a run (not pytest's)
    log = TensorBoardLog(tmp_path, "run", {})
    # tensorboard's own: the record writer its thread writes with, and that thread (as in tensorboard 2.21)
    writer = getattr(log._w.file_writer.event_writer, "_async_writer", None)
    if not (hasattr(writer, "_writer") and hasattr(writer, "_worker")):
        pytest.skip("this tensorboard's writer has other internals: no failing write can be injected")

    def disk_full(_record):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer._writer.write = disk_full
    with pytest.raises(OSError, match="No space left on device"):
        for step in range(1000):  # the writer thread fails on the first; a later call raises what it kept
            log.scalars(step, {"train/loss": 1.0})
        log._w.flush()
    writer._worker.join(10)
    assert not writer._worker.is_alive()
    assert "Traceback" not in capfd.readouterr().err

    def other():  # any other thread's exception is still printed
        raise ValueError("not tensorboard's")

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    err = capfd.readouterr().err
    assert "Traceback" in err and "not tensorboard's" in err
