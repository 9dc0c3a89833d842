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


def internal_error(prog):
    """In an `except Exception` block: print the traceback, say it is our bug; returns exit code 1."""
    traceback.print_exc()
    print(f"{prog}: internal error, a bug in this program (not in your input): please report it with the "
          f"traceback above", file=sys.stderr, flush=True)
    return FAILED
