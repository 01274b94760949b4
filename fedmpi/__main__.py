"""``python -m fedmpi``: the federated fine-tuning job."""

import sys

from fedmpi.cli import main

sys.exit(main())
