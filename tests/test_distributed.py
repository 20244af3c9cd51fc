"""vaelab under torchrun: two CPU processes with gloo train as one, evaluate as one, survive a
killed worker, and stop together on one rank's mistake."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_vaelab, synthetic_dataset
from test_train import tiny_config
from vaelab.distributed import World, from_environment
from vaelab.errors import VaelabError
from vaelab.train import build

TRAIN = ["--device", "cpu", "--test-size", "500", "--quiet", "--no-plots", "--seed", "5"]


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one thread per process, as torchrun sets it, so that one process computes as each rank does
    return {**env, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", **extra}


def vaelab(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True,
                          env=environment(), timeout=timeout)


STANDALONE = ("--standalone", "--nproc-per-node", "2")


def torchrun(*args, launcher=STANDALONE, timeout=120):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "vaelab",
                           *map(str, args)], capture_output=True, text=True, env=environment(), timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same short run in one process and in two."""
    root = tmp_path_factory.mktemp("ddp")
    one = vaelab("train", *TRAIN, "--train-size", 3000, "--epochs", 2, "--out", root / "one")
    assert one.returncode == 0, one.stderr
    logged = [a for a in TRAIN if a != "--quiet"]  # its lines are looked at below
    two = torchrun("train", *logged, "--train-size", 3000, "--epochs", 2, "--out", root / "two")
    assert two.returncode == 0, two.stderr
    return root / "one", root / "two", two


@pytest.mark.slow
def test_two_processes_train_as_one_up_to_the_order_of_sums(one_and_two):
    one, two, _ = one_and_two
    a, b = np.load(one / "batch_losses.npy"), np.load(two / "batch_losses.npy")
    assert a.shape == b.shape == (2, 30)
    np.testing.assert_allclose(b, a, rtol=1e-4)
    for x, y in zip(metrics(one), metrics(two)):
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    ["--preset", "conv", "--conv-channels", "8,16", "--likelihood", "logistic", "--optimizer", "adam", "--lr", "1e-3"],
    ["--likelihood", "gaussian-learned", "--beta", "2", "--kl-warmup", "1", "--optimizer", "adam", "--lr", "1e-3"],
    ["--prior", "vamp", "--prior-components", "20", "--posterior", "iaf", "--flow-steps", "2", "--optimizer",
     "adam", "--lr", "1e-3"],
    ["--objective", "iwae", "--k", "10", "--estimator", "dreg", "--optimizer", "adam", "--lr", "1e-3"],
    ["--preset", "burda2", "--objective", "iwae", "--k", "5", "--estimator", "dreg", "--optimizer", "adam",
     "--lr", "1e-3", "--batch-size", "100"],
    ["--free-bits", "0.2", "--grad-clip", "50", "--skip-threshold", "1000", "--optimizer", "adam", "--lr", "1e-3"],
    ["--preset", "topdown-mnist", "--width", "8", "--blocks", "1,1,1,1"],  # and its average
], ids=["conv-logistic", "mlp-gaussian-learned-beta", "vamp-iaf", "iwae-dreg", "burda2-iwae-dreg", "health",
        "topdown-ema"])
def test_the_conv_preset_and_new_likelihoods_train_as_one_in_two_processes(tmp_path, recipe):
    common = [*TRAIN, *recipe, "--train-size", 600, "--epochs", 1]
    one = vaelab("train", *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun("train", *common, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one" / "batch_losses.npy"), np.load(tmp_path / "two" / "batch_losses.npy")
    assert a.shape == b.shape == (1, 6)
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert metrics(tmp_path / "one")[0]["test_loss"] == pytest.approx(metrics(tmp_path / "two")[0]["test_loss"],
                                                                       rel=1e-4)


@pytest.mark.slow
def test_rank_zero_alone_writes_and_logs_are_lines(one_and_two):
    _, two, result = one_and_two
    assert result.stdout.count("run saved in") == 1  # rank 0's summary only
    assert "\r" not in result.stderr  # no progress bar redrawn into a log
    assert sorted(p.name for p in two.iterdir()) == [".torchrun-id", "batch_losses.npy", "checkpoint.safetensors",
                                                     "config.json", "metrics.jsonl", "model.safetensors"]


@pytest.mark.slow
def test_sharded_evaluation_is_identical_to_one_process(one_and_two, tmp_path):
    import shutil

    _, two, _ = one_and_two
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    shutil.copytree(two, single)
    shutil.copytree(two, sharded)
    a = vaelab("evaluate", single, "--k", 200, "--test-size", 700, "--quiet")
    assert a.returncode == 0, a.stderr
    b = torchrun("evaluate", sharded, "--k", 200, "--test-size", 700, "--quiet")
    assert b.returncode == 0, b.stderr
    assert np.array_equal(np.load(single / "log_px.npy"), np.load(sharded / "log_px.npy"))
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "processes")}
    ra, rb = (json.loads((d / "eval.json").read_text()) for d in (single, sharded))
    assert drop(ra) == drop(rb) and rb["processes"] == 2


@pytest.mark.slow
def test_sharded_evaluation_of_a_vamp_iaf_model_is_identical_to_one_process(tmp_path):
    trained = vaelab("train", *TRAIN, "--train-size", 600, "--epochs", 1, "--prior", "vamp", "--prior-components",
                     20, "--posterior", "iaf", "--optimizer", "adam", "--lr", 1e-3, "--out", tmp_path / "single")
    assert trained.returncode == 0, trained.stderr
    import shutil

    shutil.copytree(tmp_path / "single", tmp_path / "sharded")
    a = vaelab("evaluate", tmp_path / "single", "--k", 100, "--test-size", 300, "--quiet")
    assert a.returncode == 0, a.stderr
    b = torchrun("evaluate", tmp_path / "sharded", "--k", 100, "--test-size", 300, "--quiet")
    assert b.returncode == 0, b.stderr
    assert np.array_equal(np.load(tmp_path / "single" / "log_px.npy"), np.load(tmp_path / "sharded" / "log_px.npy"))


@pytest.mark.slow
def test_two_processes_share_the_gaps_and_find_what_one_finds(one_and_two, tmp_path):
    import shutil

    one, _, _ = one_and_two
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    shutil.copytree(one, single)
    shutil.copytree(one, sharded)
    args = ["--images", 100, "--k", 100, "--steps", 30, "--quiet"]
    a = vaelab("gap", single, *args)
    assert a.returncode == 0, a.stderr
    b = torchrun("gap", sharded, *args)
    assert b.returncode == 0, b.stderr
    ra, rb = (json.loads((d / "gap.json").read_text()) for d in (single, sharded))
    for name in ("log_px", "elbo_fitted", "elbo_encoder", "approximation_gap", "amortization_gap"):
        assert rb[name]["mean"] == pytest.approx(ra[name]["mean"], rel=1e-5, abs=1e-5), name


OWN_NETWORKS = """
import sys
import torch
from torch import nn
import vaelab
from vaelab import distributed

world = distributed.from_environment()
torch.manual_seed(0)
encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh())
decoder = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 784))
config = vaelab.RunConfig(epochs=1, train_size=600, test_size=500, optimizer="adam", lr=1e-3, device="cpu",
                          seed=5)
model = vaelab.VAE(encoder, decoder, z_dim=2, prior="mog", prior_components=5)
vaelab.fit(vaelab.build(config, progress=False, world=world, model=model), sys.argv[1], progress=False)
distributed.finish(world)
distributed.stop()
"""


@pytest.mark.slow
def test_a_model_of_your_own_networks_trains_as_one_in_two_processes(tmp_path):
    script = tmp_path / "own.py"
    script.write_text(OWN_NETWORKS)
    one = subprocess.run([sys.executable, script, tmp_path / "one"], capture_output=True, text=True,
                         env=environment(), timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", *STANDALONE, script, tmp_path / "two"],
                         capture_output=True, text=True, env=environment(), timeout=120)
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one" / "batch_losses.npy"), np.load(tmp_path / "two" / "batch_losses.npy")
    assert a.shape == b.shape == (1, 6)
    np.testing.assert_allclose(b, a, rtol=1e-4)


def worker_pids(out: Path) -> list[int]:
    """The torchrun workers (not the agent) of the run writing to out."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmd and b"vaelab" in cmd and not any(b"torch.distributed.run" in c for c in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_killed_worker_restarted_by_torchrun_ends_as_the_uninterrupted_run(tmp_path):
    # a VampPrior and an IAF: every kind of parameter and optimizer state goes through the restart
    args = [*TRAIN, "--train-size", 20000, "--epochs", 4, "--optimizer", "adam", "--lr", 1e-3,
            "--prior", "vamp", "--prior-components", 20, "--posterior", "iaf", "--flow-steps", 2]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = torchrun("train", *args, "--out", whole)
    assert done.returncode == 0, done.stderr

    launcher = ("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "vaelab", "train",
                             *map(str, args), "--out", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())
    deadline = time.time() + 120
    while time.time() < deadline:  # kill one worker during epoch 2
        if (killed / "metrics.jsonl").exists() and (killed / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    victims = worker_pids(killed)
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    saved = (killed / "metrics.jsonl").read_text().count("\n")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert 1 <= saved < 4, "the kill did not land mid-run"
    assert metrics(killed) == metrics(whole)
    assert same_weights(killed, whole)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_mistake_on_one_node_ends_the_job_with_its_line(tmp_path):
    port = free_port()
    launcher = lambda: ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mistake")
    command = [sys.executable, "-m", "torch.distributed.run", *launcher(), "-m", "vaelab", "train", *TRAIN,
               "--train-size", "1000", "--epochs", "2", "--out", str(tmp_path / "run")]
    good = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    bad = subprocess.run([*command, "--data-dir", str(tmp_path / "nowhere")], capture_output=True, text=True,
                         env=environment(), timeout=120)
    good.communicate(timeout=120)
    assert bad.returncode != 0 and good.returncode != 0
    assert "does not exist; pass --data-dir DIR" in bad.stderr
    line = next(x for x in bad.stderr.splitlines() if x.startswith("vaelab: error"))
    assert line.startswith("vaelab: error (rank ")


def test_the_global_batch_must_divide_among_the_processes():
    with pytest.raises(VaelabError, match="--batch-size 50 does not divide among 3 processes"):
        build(tiny_config(), data=synthetic_dataset(), progress=False, world=World(rank=0, size=3))


def test_the_world_comes_from_torchruns_environment():
    world = from_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert world == World(rank=1, size=4, local_rank=1, restarts=2, torchrun=True)
    assert not world.main and world.distributed
    assert from_environment({}) == World() and World().main


@pytest.mark.parametrize("command", [["plot", "RUN"], ["sample", "RUN", "-o", "x.png"], ["report", "RUN"]])
def test_commands_of_one_process_refuse_torchrun_in_one_line(command):
    result = run_vaelab(*command, env=dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"vaelab: error (rank 0): vaelab {command[0]} runs in one process: " \
                                    "start it without torchrun"


def test_under_torchrun_a_run_needs_out():
    from vaelab.start import prepare

    with pytest.raises(VaelabError, match="under torchrun, give --out DIR"):
        prepare({"device": "cpu"}, world=World(rank=0, size=2, torchrun=True))


def test_a_restart_before_the_first_checkpoint_starts_afresh_in_the_same_folder(tmp_path):
    from vaelab.runs import save_config
    from vaelab.start import claim, plan

    options, out = dict(device="cpu", epochs=3), tmp_path / "run"
    config, run_dir, resume = plan(options, out, world=World())
    run_dir.mkdir()
    save_config(run_dir, config)
    claim(run_dir, "job-1")
    restarted = World(rank=0, size=2, restarts=1, torchrun=True, run_id="job-1")
    again, same_dir, resume = plan(options, out, world=restarted)
    assert again == config and same_dir == run_dir and resume  # fit: no checkpoint, so from epoch 1
    assert (run_dir / "config.json").exists() and not (run_dir / "checkpoint.safetensors").exists()

    save_config(run_dir, config)
    with pytest.raises(VaelabError, match="describes another run"):
        plan(dict(device="cpu", epochs=4), run_dir, world=restarted)


def test_a_restart_never_takes_over_a_folder_another_job_created(tmp_path):
    from vaelab.runs import save_config
    from vaelab.start import claim, plan

    options, out = dict(device="cpu"), tmp_path / "run"
    config, run_dir, _ = plan(options, out, world=World())
    run_dir.mkdir()
    save_config(run_dir, config)
    claim(run_dir, "someone-else")
    with pytest.raises(VaelabError, match="holds a run with no finished epoch"):  # refused as new
        plan(options, out, world=World(rank=0, size=2, restarts=1, torchrun=True, run_id="job-2"))
    assert (run_dir / "config.json").exists()  # left alone


@pytest.mark.slow
def test_two_processes_encode_and_score_what_one_does(one_and_two, tmp_path):
    one, _, _ = one_and_two
    for command, extra in (("encode", []), ("score", ["--k", 100])):
        args = ["--images", 700, "--quiet", *extra]
        a = vaelab(command, one, "-o", tmp_path / f"{command}1.npz", *args)
        assert a.returncode == 0, a.stderr
        b = torchrun(command, one, "-o", tmp_path / f"{command}2.npz", *args)
        assert b.returncode == 0, b.stderr
        single, sharded = np.load(tmp_path / f"{command}1.npz"), np.load(tmp_path / f"{command}2.npz")
        assert single.files == sharded.files
        assert all(np.array_equal(single[name], sharded[name]) for name in single.files), command
