"""Cluster runs that heal themselves: a rank killed under plain `torchrun --max-restarts` (one
node, and two "nodes" in network namespaces) restarts the job, which resumes and ends bit for
bit as an uninterrupted run; a checkpoint resumes on another world size; setr-train's answers.

Every job runs with tests/jobs.py: a timeout that fails the test instead of hanging, and a check
that no process of the job is left. One uninterrupted 2-rank run is the reference of all of them."""
import datetime
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.run import get_args_parser

from jobs import (MAIN, REPO, TORCHRUN, finish, kill_leftovers, python_main, rank_pid, run_job,  # noqa: F401
                  start, torchrun, train_losses, train_records, wait_for_iterations)
from train import launch, parallelize
from train.config import ConfigError, config_differences, parse_config

# The demo model on 32 synthetic images, 12 iterations, checkpoints at 6 and 12.
ARGS = ["--device", "cpu", "--preset", "demo", "--head", "pup", "--deterministic", "--log-interval", "1",
        "--eval-interval", "0", "--metrics.progress_bar", "off", "--num-workers", "0",
        "--data.synthetic_train_samples", "32", "--data.synthetic_val_samples", "4", "--max-iters", "12",
        "--ckpt-interval", "6"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (2 ranks): its work dir."""
    work = str(tmp_path_factory.mktemp("reference") / "run")
    code, out, _ = run_job(torchrun(2) + ARGS + ["--work-dir", work], timeout=120)
    assert code == 0, out[-3000:]
    return work


def _assert_equal_runs(work_dir, reference):
    """Every iteration's loss (the later record of one logged twice) and the exported weights
    equal the reference run's, bit for bit."""
    assert train_losses(work_dir) == train_losses(reference)
    ours, theirs = (torch.load(os.path.join(w, "model_final.pth"))["state_dict"] for w in (work_dir, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _kill_between_checkpoints(work_dir, launcher, rank):
    """SIGKILL rank `rank` (a child of the launcher process) once a random iteration in 7..9
    is logged: after checkpoint 6, before checkpoint 12. Returns that iteration."""
    kill_at = random.randint(7, 9)  # the kill lands an iteration or two later on a busy machine
    wait_for_iterations(work_dir, launcher, kill_at, timeout=90, poll=0.02)
    os.kill(rank_pid(launcher.pid, rank), signal.SIGKILL)
    return kill_at


def _assert_restarted_from_checkpoint_6(work_dir, kill_at, out):
    iters = [r["iter"] for r in train_records(work_dir)]
    killed = len(iters) - 6  # iterations logged before the kill
    assert kill_at <= killed < 12 and iters == list(range(1, killed + 1)) + list(range(7, 13)), (kill_at, iters)
    assert "resumed from" in out and "iter_00000006 at iteration 6" in out, out[-3000:]


def test_a_rank_killed_under_torchrun_restarts_the_job_bitwise(reference, tmp_path):
    """`torchrun --max-restarts=1 ... --resume auto` as the README gives it: rank 1 killed at a
    random iteration between two checkpoints; torchrun restarts both ranks, the job resumes from
    the newest complete checkpoint, ends with exit status 0 and equals the uninterrupted run."""
    work = str(tmp_path / "run")
    proc, marker = start(torchrun(2, "--max-restarts=1") + ARGS + ["--work-dir", work, "--resume", "auto"])
    kill_at = _kill_between_checkpoints(work, proc, rank=1)
    code, out = finish(proc, marker, timeout=120)
    assert code == 0, out[-3000:]
    _assert_restarted_from_checkpoint_6(work, kill_at, out)
    _assert_equal_runs(work, reference)


def test_resume_on_another_world_size(reference, tmp_path):
    """2 -> 1 -> 2 ranks: the model and optimizer are resharded, the data position is kept, the
    RNG states are not restored and the log says so; the losses follow the 2-rank run's."""
    work = tmp_path / "run"
    shutil.copytree(reference, work, ignore=shutil.ignore_patterns("iter_00000012", "latest", "*.jsonl", "*.pth"))
    code, out, _ = run_job(python_main() + ARGS + ["--work-dir", str(work), "--resume", "auto", "--ckpt-interval", "3"])
    assert code == 0 and "at iteration 6: model, optimizer, lr schedule and data position (48) restored" in out
    assert "RNG states not restored (the checkpoint has 2 ranks' states, this run 1;" in out, out[-3000:]
    shutil.rmtree(work / "checkpoints" / "iter_00000012")  # resume the checkpoint 1 rank wrote at 9 on 2
    os.remove(work / "checkpoints" / "latest")
    code, out, _ = run_job(torchrun(2) + ARGS + ["--work-dir", str(work), "--resume", "auto"])
    assert code == 0 and "at iteration 9: model, optimizer, lr schedule and data position (72)" in out
    assert "(the checkpoint has 1 ranks' states, this run 2;" in out, out[-3000:]
    ours, theirs = train_losses(work), train_losses(reference)
    assert sorted(ours) == list(range(7, 13))
    for i in ours:  # world sizes 1 and 2 sum in another order: equal to float32 rounding
        assert ours[i] == pytest.approx(theirs[i], rel=1e-4), (i, ours[i], theirs[i])


def test_a_new_attempt_deletes_the_nccl_dump_signal_a_failed_one_left(monkeypatch):
    """NCCL keeps its flight-recorder dump signal in the root of torchrun's store, which outlives
    the attempts: rank 0 of a new attempt deletes it before any rank can make its group, and
    every attempt gets a new name."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "nccl-test")
    store, timeout = dist.HashStore(), datetime.timedelta(seconds=5)
    first = parallelize._attempt_name(store, 0, 1, timeout)
    store.set("exception_dump", b"\x01\x00\x00\x00")  # what a rank whose collective timed out sets
    store.set(f"{first}/exception_dump", b"")  # a key in the attempt's namespace stays
    second = parallelize._attempt_name(store, 0, 1, timeout)
    assert second != first and not store.check(["exception_dump"]) and store.check([f"{first}/exception_dump"])
    assert parallelize.NCCL_ROOT_KEYS == ("exception_dump",)


# ------------------------------------------------------------------------------------------------
# two nodes: network namespaces joined by a veth pair
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def two_nodes():
    """[(namespace, interface, address)] of two "nodes", removed afterwards whatever happened;
    skips when namespaces cannot be made (needs root and iproute2)."""
    tag = uuid.uuid4().hex[:8]
    nodes = [(f"setr{tag}n{i}", f"setr{tag}v{i}", f"10.93.0.{i + 1}") for i in range(2)]
    commands = [["ip", "netns", "add", nodes[0][0]], ["ip", "netns", "add", nodes[1][0]],
                ["ip", "link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1]]]
    for namespace, interface, address in nodes:
        commands += [["ip", "link", "set", interface, "netns", namespace],
                     ["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface],
                     ["ip", "-n", namespace, "link", "set", interface, "up"],
                     ["ip", "-n", namespace, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"cannot make network namespaces ({' '.join(command)}: {e})")
            if result.returncode:
                pytest.skip(f"cannot make network namespaces ({' '.join(command)}: {result.stderr.strip()})")
        yield nodes
    finally:
        for namespace, _, _ in nodes:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def _start_nodes(nodes, work, *options):
    """One torchrun per namespace, c10d rendezvous hosted on node 0: [(launcher, marker)]."""
    rendezvous = [f"--nnodes={len(nodes)}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint={nodes[0][2]}:29400", "--rdzv_id=two-nodes", *options]
    jobs = []
    for i, (namespace, interface, address) in enumerate(nodes):
        command = ["ip", "netns", "exec", namespace] + TORCHRUN + rendezvous + [
            f"--rdzv_conf=is_host={str(i == 0).lower()}", f"--local_addr={address}", MAIN]
        # the hostname resolves to 127.0.0.1 in a namespace: gloo binds to the veth instead
        jobs.append(start(command + ARGS + ["--work-dir", work, "--resume", "auto"], GLOO_SOCKET_IFNAME=interface))
    return jobs


def test_two_nodes_finish_and_heal(reference, two_nodes, tmp_path):
    """Two nodes, one rank each, one shared work dir: the run finishes on both nodes, every
    iteration is logged once, one model_final.pth is written, equal to the one-node run's. Then
    a rank killed on node 1 restarts the job on both nodes, which resumes and ends bitwise."""
    work = str(tmp_path / "run")
    outs = [finish(proc, marker, timeout=120) for proc, marker in _start_nodes(two_nodes, work)]
    assert [code for code, _ in outs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [r["iter"] for r in train_records(work)] == list(range(1, 13))
    assert [name for name in os.listdir(work) if name.endswith(".pth")] == ["model_final.pth"]
    _assert_equal_runs(work, reference)

    work = str(tmp_path / "healed")
    (node0, marker0), (node1, marker1) = _start_nodes(two_nodes, work, "--max-restarts=1")
    kill_at = _kill_between_checkpoints(work, node1, rank=1)
    (code0, out0), (code1, out1) = finish(node0, marker0, timeout=120), finish(node1, marker1, timeout=30)
    assert (code0, code1) == (0, 0), out0[-2000:] + out1[-2000:]
    _assert_restarted_from_checkpoint_6(work, kill_at, out0)
    _assert_equal_runs(work, reference)


# ------------------------------------------------------------------------------------------------
# setr-train: usage errors once, the status of the rank that failed first
# ------------------------------------------------------------------------------------------------

def test_setr_train_parses_once_and_refuses_abbreviations(capsys, monkeypatch):
    """A usage error is printed once, before any process starts; a flag abbreviation is one."""
    with pytest.raises(SystemExit) as stop:
        launch.main(["--standalone", "--nproc-per-node=2", "--head", "pup", "--max-iter", "5"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("setr-train: error: unrecognized arguments: --max-iter 5") == 1, err
    assert launch.split_argv(["--nnodes", "2", "--max_restarts=3", "--standalone", "--head", "pup", "-m", "x"],
                             get_args_parser()) == (["--nnodes", "2", "--max_restarts=3", "--standalone"],
                                                  ["--head", "pup", "-m", "x"])
    # under plain torchrun every rank parses: only the first rank of a node prints
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit):
        parse_config(["--max-iter", "5"])
    assert capsys.readouterr().err == ""


def test_setr_train_exits_with_the_status_of_the_rank_of_its_node_that_failed_first():
    """Echoes of another rank's failure: SIGTERM or 143 (torchrun stops the other ranks) beside
    another failure or on a multi-node job, SIGKILL later than the node's first failure (torchrun's,
    30 s after its SIGTERM). Exit 1 decides only when no other status does."""
    def failure(code, at):
        return SimpleNamespace(exitcode=code, timestamp=at, pid=100 + at)

    def status(several_nodes, *failures):
        return launch.exit_status(dict(enumerate(failures)), several_nodes)

    killed = "setr-train: rank {} (pid {}) was killed by SIG{}".format
    for several in (False, True):
        assert status(several, failure(1, 5), failure(2, 6), failure(-15, 6)) == (2, None)
        assert status(several, failure(143, 7), failure(-9, 6)) == (137, killed(1, 106, "KILL"))  # the OOM killer
        assert status(several, failure(1, 5), failure(-9, 5)) == (137, killed(1, 105, "KILL"))
        assert status(several, failure(-11, 5), failure(-15, 5)) == (139, killed(0, 105, "SEGV"))
        assert status(several, failure(1, 5), failure(-15, 5), failure(-9, 36)) == (1, None)  # the rank says why
    # one node, nothing but SIGTERMs: the ranks were signalled from outside
    assert status(False, failure(143, 5), failure(143, 5)) == (143, None)
    assert status(False, failure(-15, 5)) == (143, killed(0, 105, "TERM"))
    # several nodes: a node whose ranks torchrun only stopped says so
    elsewhere = ("setr-train: torchrun stopped the ranks of this node ({}) because a rank on another node failed; "
                 "the setr-train of that node reports it").format
    assert status(True, failure(-15, 5)) == (1, elsewhere("0"))
    assert status(True, failure(143, 5), failure(-15, 5), failure(-9, 36)) == (1, elsewhere("0, 1, 2"))


# ------------------------------------------------------------------------------------------------
# the documented commands
# ------------------------------------------------------------------------------------------------

def _documented_training_flags():
    """(command, training flags) of every training command in the READMEs' bash blocks."""
    found = []
    for doc in ("README.md", os.path.join("train", "README.md")):
        with open(os.path.join(REPO, doc)) as f:
            blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
        for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            launcher = next((i for i, w in enumerate(words) if w.endswith(("train/main.py", "run_train.sh", "setr-train"))),
                            None)
            if launcher is not None and "--help" not in words:
                flags = words[launcher + 1:]
                if words[launcher] == "setr-train":
                    flags = launch.split_argv(flags, get_args_parser())[1]
                found.append((line.strip(), flags))
    return found


def test_documented_commands_each_use_their_own_work_dir(monkeypatch):
    """Two documented commands that would run on the same machine (GPU or not) in the same work
    dir are the same run (one may resume the other): e.g. the CamVid example is not the demo's."""
    commands = _documented_training_flags()
    assert len(commands) >= 10 and any("camvid" in c for c, _ in commands)
    valid = set()
    for cuda in (False, True):
        runs = {}
        for command, flags in commands:
            cfg = parse_config(flags, cuda_available=cuda)
            with monkeypatch.context() as m:  # valid on such a machine when its files exist
                for name in ("isdir", "isfile", "exists"):
                    m.setattr(os.path, name, lambda _path: True)
                try:
                    cfg.validate()
                except ConfigError:  # a GPU command (--data-root) on the CPU demo preset, or the reverse
                    continue
            valid.add(command)
            runs.setdefault(os.path.normpath(cfg.work_dir), []).append((command, cfg))
        for same_dir in runs.values():
            (first, cfg), *others = same_dir
            for command, other in others:
                assert not config_differences(json.loads(json.dumps(cfg.to_dict())), other), (first, command)
    assert [command for command, _ in commands if command not in valid] == []  # each one valid somewhere
