"""Expected errors (bad input, not bugs) and how a stage reports them.

Every error a user can cause and fix — a malformed data row, a corrupt model
file, an output path that cannot be written, a bad param — is a ``UserError``
(or a subclass: ``DataError``, ``ConfigError``, ``ModelError``, ``FetchError``,
``WriteError``). Its message names the file, row or key and says
what to do. A stage's ``main`` runs under ``run_stage``, which prints such an
error as one line, ``<stage>: <message>``, and exits 1; anything else is a bug
and keeps its traceback.
"""

import sys
from pathlib import Path


class UserError(Exception):
    """Base class of every expected error: the message alone tells the user what to fix."""


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message says which file and row."""


class ConfigError(UserError, ValueError):
    """A params.yaml section that cannot be used; the message names the key (toolcall.config)."""


class ModelError(UserError):
    """A model file is missing, corrupt or inconsistent; the message says which."""


class WriteError(UserError):
    """An output cannot be written (no space, no permission); nothing partial was left."""


def run_stage(main):
    """Run a stage's ``main()``; expected errors and Ctrl-C become one line on stderr.

    Exit status 1 for a ``UserError``, 130 (the shell's convention for SIGINT)
    for Ctrl-C. Outputs are written atomically (``toolcall.io``), so either
    way the outputs of an earlier run are left as they were.
    """
    stage = Path(sys.modules[main.__module__].__file__).stem
    try:
        main()
    except UserError as e:
        print(f"{stage}: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted (Ctrl-C); no output is half-written, rerun the stage to finish it",
              file=sys.stderr)
        sys.exit(130)
