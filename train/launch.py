"""`setr-train`: torchrun for train/main.py, with one clean answer per failure.

    setr-train [torchrun options] [training flags]
    setr-train --standalone --nproc-per-node=2 --head pup                  # the CPU demo, 2 processes
    setr-train --nproc-per-node=8 --max-restarts=3 --head pup --data-root ... --resume auto
    setr-train --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 \\
        --rdzv-id=setr --head pup --data-root ... --work-dir /shared/runs/pup   # on every node

It runs exactly `torchrun [torchrun options] train/main.py [training flags]` (`torchrun --help`
lists the options; -m, --no-python and --run-path are not taken), and differs at the ends: the
training flags are parsed here first, so a usage error is printed once, before any process
starts; and it exits with the status of the rank that failed first (2 bad input, 130 / 143
stopped by SIGINT / SIGTERM after the final checkpoint, 1 any other failure; a rank that only
stopped because a peer failed exits 1, so it decides only when no rank says more), after the
rank's own one-line error, without torchrun's log lines and ChildFailedError traceback.
"""
import os
import signal
import sys

if __package__ in (None, ""):  # `python train/launch.py` (run_train.sh)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py")
NOT_TAKEN = ("-h", "--help", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")


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


def exit_status(failures):
    """(status, what to say) from torchrun's {rank: ProcessFailure}: the first failure by time
    whose status is not 1 (1: probably an echo of a peer's failure), else the first one."""
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)
    rank, failure = next(((r, f) for r, f in ordered if f.exitcode != 1), ordered[0])
    if failure.exitcode < 0:  # killed by a signal: the rank could say nothing itself
        name = signal.Signals(-failure.exitcode).name
        return 128 - failure.exitcode, f"setr-train: rank {rank} (pid {failure.pid}) was killed by {name}"
    return failure.exitcode, None


def main(argv=None):
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from train.config import parse_config

    argv = sys.argv[1:] if argv is None else argv
    options, flags = split_argv(argv, torchrun.get_args_parser())
    if "-h" in flags or "--help" in flags:
        print("setr-train [torchrun options (torchrun --help)] [training flags, below]\n")
    parse_config(flags)  # exits 2 with the usage error (0 after --help)
    logging.disable(logging.ERROR)  # torchrun's own lines: what the ranks say, and its traceback
    try:
        torchrun.run(torchrun.parse_args(options + [MAIN] + flags))
    except ChildFailedError as e:
        status, note = exit_status(e.failures)
    except SignalException as e:  # forwarded to the ranks, which checkpoint and exit with 128 + signal
        status, note = 128 + int(e.sigval), None
    except Exception as e:  # noqa: BLE001 - rendezvous timeouts, a bad option value, ...
        status, note = 1, f"setr-train: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    else:
        status, note = 0, None
    if note:
        print(note, file=sys.stderr, flush=True)
    return status


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
