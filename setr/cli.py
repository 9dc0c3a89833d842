"""How every command line ends: a user's mistake is one line on stderr naming the thing and what
was expected (exit 2; 1 when it stops a run already under way), anything else is a bug of ours,
shown with its traceback and called one (exit 1). Imports nothing heavy."""
import sys
import traceback

BAD_INPUT = 2  # a file, flag, dataset or checkpoint that cannot work
FAILED = 1  # a run that started and could not finish, or a bug


def error(message, code=BAD_INPUT):
    """Print `error: message` on stderr; returns the exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run(prog, body, mistakes):
    """body() -> exit code. An exception of the classes `mistakes` is the user's: one line, exit 2;
    Ctrl-C: exit 130; any other exception is a bug: its traceback, said to be one, exit 1."""
    try:
        return body()
    except mistakes as e:
        return error(e)
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - not the user's input: ours
        traceback.print_exc()
        print(f"{prog}: internal error, a bug in this program (not in your input): please report it with the "
              f"traceback above", file=sys.stderr, flush=True)
        return FAILED
