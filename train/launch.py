"""`setr-train`: torchrun for train/main.py, with one clean answer per failure.

    setr-train [torchrun options] [training flags]
    setr-train --standalone --nproc-per-node=2 --head pup                  # the CPU demo, 2 processes
    setr-train --nproc-per-node=8 --max-restarts=3 --head pup --data-root ... --resume auto
    setr-train --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 \\
        --rdzv-id=setr --local-addr=ADDR --head pup --data-root ... --work-dir /shared/runs/pup   # every node

It runs exactly `torchrun [torchrun options] train/main.py [training flags]` (`torchrun --help`
lists the options; -m, --no-python and --run-path are not taken), and differs at the ends: the
training flags are parsed here first, so a usage error is printed once, before any process
starts (`--help` answers before torch loads); and it exits with the status of the rank of this
node that failed first (2 bad input, 130 / 143 stopped by SIGINT / SIGTERM after the final
checkpoint, 1 any other failure; see exit_status for the ranks that only echo another's
failure), after the rank's own one-line error, without torchrun's log lines and
ChildFailedError traceback. Each node reports its own ranks: on a multi-node job, the node of
the rank that failed first gives its status, and a node whose ranks torchrun only stopped says
that a rank elsewhere failed.
"""
import os
import signal
import sys

if __package__ in (None, ""):  # `python train/launch.py` (run_train.sh)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from setr.files import first_line  # noqa: E402

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py")
NOT_TAKEN = ("-h", "--help", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")
USAGE = "setr-train [torchrun options (torchrun --help)] [training flags, below]"


def split_argv(argv, torchrun_parser):
    """[torchrun options..., training flags...] -> (torchrun options, training flags): the
    torchrun options are the leading arguments that name one (--opt value, --opt=value, --flag)."""
    options = {name: action for name, action in torchrun_parser._option_string_actions.items()
               if name not in NOT_TAKEN}
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in options:
        takes_value = options[argv[i].split("=", 1)[0]].nargs != 0
        i += 2 if takes_value and "=" not in argv[i] else 1
    return argv[:i], argv[i:]


def exit_status(failures, several_nodes):
    """(status, what to say) from torchrun's {rank: ProcessFailure} of this node, torchrun itself
    not signalled (that is SignalException). After a rank failed, torchrun stops the node's other
    ranks: SIGTERM (they end by it, or exit 143 after their final checkpoint), then SIGKILL for
    those still running 30 s later. So these failures are echoes of another one:
      SIGTERM, 143   when the node holds another failure, or the job spans several nodes
      SIGKILL        when it came later than the node's first failure (the kernel's OOM killer
                     or a user kills first; torchrun only 30 s after its SIGTERM)
    The answer is the first of the other failures by time whose status is not 1 (a rank exits 1
    also when its collective failed because a peer went down: it says so), else the first one;
    a signal gets a line. When every failure is an echo: on a multi-node job, torchrun stopped
    this node's ranks because a rank on another node failed (that node reports it): 1 and a
    line; on one node, the first failure (its ranks were signalled from outside)."""
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)
    first = ordered[0][1].timestamp

    def echo(failure):
        if failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM):
            return len(failures) > 1 or several_nodes
        return failure.exitcode == -signal.SIGKILL and failure.timestamp > first

    own = [(rank, failure) for rank, failure in ordered if not echo(failure)]
    if own:
        rank, failure = next(((r, f) for r, f in own if f.exitcode != 1), own[0])
    elif several_nodes:
        return 1, (f"setr-train: torchrun stopped the ranks of this node ({', '.join(map(str, sorted(failures)))}) "
                   f"because a rank on another node failed; the setr-train of that node reports it")
    else:
        rank, failure = ordered[0]
    if failure.exitcode < 0:  # killed by a signal: the rank could say nothing itself
        name = signal.Signals(-failure.exitcode).name
        return 128 - failure.exitcode, f"setr-train: rank {rank} (pid {failure.pid}) was killed by {name}"
    return failure.exitcode, None


def main(argv=None):
    from train.config import parse_config

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:  # before torch (torchrun's parser) loads
        print(USAGE + "\n")
        parse_config(["--help"], prog="setr-train")  # exits 0

    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    options, flags = split_argv(argv, torchrun.get_args_parser())
    parse_config(flags, prog="setr-train")  # exits 2 with the usage error
    args = torchrun.parse_args(options + [MAIN] + flags)
    logging.disable(logging.ERROR)  # torchrun's own lines: what the ranks say, and its traceback
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        nodes = int(args.nnodes.split(":")[-1])  # --nnodes 2, or 1:4 (elastic): the most
        status, note = exit_status(e.failures, several_nodes=nodes > 1)
    except SignalException as e:  # forwarded to the ranks, which checkpoint and exit with 128 + signal
        status, note = 128 + int(e.sigval), None
    except Exception as e:  # noqa: BLE001 - rendezvous timeouts, a bad option value, ...
        text = first_line(e)
        if type(e).__name__ == "RendezvousClosedError":  # another node's torchrun ended the job
            text = "another node closed the job's rendezvous (its ranks failed, or it was stopped: it reports why)"
        status, note = 1, f"setr-train: error: {type(e).__name__}: {text}"
    else:
        status, note = 0, None
    if note:
        print(note, file=sys.stderr, flush=True)
    return status


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
