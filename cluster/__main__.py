"""python -m cluster check FILE...: see cluster/check.py."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the settings import TensorFlow via train

from cluster.check import main

sys.exit(main(sys.argv[1:]))
