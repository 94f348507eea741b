import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the brute-force references in tests/reference.py

import os

from hypothesis import settings

# CI and the README's test command draw the same examples every run (a pass or a failure reproduces on any
# clone); ``GROUPSPARSE_HYPOTHESIS=attack`` draws new random ones each run, to hunt (README: Testing).
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("attack", derandomize=False, print_blob=True)
settings.load_profile("attack" if os.environ.get("GROUPSPARSE_HYPOTHESIS") == "attack" else "repeatable")
