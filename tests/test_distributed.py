"""`torchrun --nproc_per_node 2 -m clr_mlflow run ...` on the CPU with gloo: one MLflow run,
curves of the right length, and the same weights on both ranks at the end."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_one_run_with_identical_weights(tracking, cifar, data_dir):
    MlflowClient().search_experiments()  # the schema exists before the ranks start
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "clr_mlflow", "run", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "1200",
           "--limit-test", "64", "--batch-size", "16", "--image-size", "16", "--num-iters", "60", "--lr-start", "1e-4",
           "--bounds-rule", "loss_edge", "--iterations", "20", "--step-size", "5", "--device", "cpu",
           "--experiment", "ddp", "--system-metrics", "false"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("| range test: ") == 1  # rank 0 reports, rank 1 stays quiet
    runs = mlflow.search_runs(experiment_names=["ddp"])
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"  # one run, not two
    run = MlflowClient().get_run(runs["run_id"][0])
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["world_size"] == "2" and p["global_batch_size"] == "32"
    assert p["iters_per_epoch"] == str(1080 // 32)  # 1200 less 10% validation, in global batches
    assert t["ddp.weights_identical"] == "true"
    n = int(m["range_test/iterations"])
    lr = MlflowClient().get_metric_history(run.info.run_id, "range_test/lr")
    assert 10 <= n <= 60 and sorted(x.step for x in lr) == list(range(n))
    assert sorted(x.step for x in MlflowClient().get_metric_history(run.info.run_id, "train/lr")) == list(range(20))
