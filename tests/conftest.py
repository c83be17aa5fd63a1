import contextlib
import os
import sys

import pytest

# Tests import the tiny-model helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Where Triton kernels run: compiled on CUDA tensors where CUDA exists, Triton's interpreter on
# CPU tensors elsewhere (kernel_device.decide). The flag must be set before anything imports
# triton (torch may import it lazily), so it is applied by the first file pytest loads.
import kernel_device  # noqa: E402, F401


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
