import contextlib
import os
import sys

import pytest

# No GPU here: Triton kernels run in Triton's interpreter. Must be set before anything imports
# triton (torch may import it lazily), so it lives at the top of the first file pytest loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the tiny-model helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def configure():
    """``configure(field=value, ...)`` replaces fields of the process configuration
    (``pipespec_fast.config.current()``) for the rest of the test; the configuration read
    from the environment is back afterwards. Tests change settings this way, not through
    ``os.environ``: the engine reads the environment once."""
    from pipespec_fast import config

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(
            config.use(config.current().replace(**changes)))
