import os
import sys

# No GPU here: Triton kernels run in Triton's interpreter. Must be set before anything imports
# triton (torch may import it lazily), so it lives at the top of the first file pytest loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the tiny-model helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
