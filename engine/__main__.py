"""``python -m engine ...``. Once ``generate`` has shut its engine down (workers and any Ray cluster
it started are gone), the process exits without the interpreter's teardown: unloading torch's
modules takes ~0.7 s, longer than a short generation."""
import logging
import os
import sys

from engine.entrypoints.cli import main

rc = main()
if sys.argv[1:2] == ["generate"]:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)
sys.exit(rc)
