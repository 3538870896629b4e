"""Run the real trainer on synthetic or demo data: ``torchrun ... tests/train_harness.py --config X [k=v]``.

``STUNET_TEST_DATA=synthetic`` (default) plugs in tests/synthetic_data.py's SyntheticDataSource; ``real`` uses the shipped
stream (stunet_scale.data.stream.loader) on a prepared store.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    from stunet_scale.train import main

    data = None
    if os.environ.get("STUNET_TEST_DATA", "synthetic") == "synthetic":
        from synthetic_data import SyntheticDataSource as data
    sys.exit(main(sys.argv[1:], data=data))
