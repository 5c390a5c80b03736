"""Train the pixel-space video DiT (rectified flow, masked conditioning, dynamic/freeze-time context).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python training/train_base.py --preset demo
    python training/train_base.py --preset tiny --data.grids outputs/demo/pseudo4d
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from training.launch import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("base", __doc__)
