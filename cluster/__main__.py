"""python -m cluster check FILE...: see cluster/check.py.
python -m cluster kuberay [--check]: see cluster/kuberay.py."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the settings import TensorFlow via train

if sys.argv[1:2] == ["kuberay"]:
    from cluster.kuberay import main as kuberay_main

    sys.exit(kuberay_main(sys.argv[2:]))

from cluster.check import main

sys.exit(main(sys.argv[1:]))
