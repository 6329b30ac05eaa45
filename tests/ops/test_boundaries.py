"""``fasteto.ops`` knows tensors, not models or layouts: importing it loads neither transformers nor
``fasteto.packing``, so other DPO code can take the ops alone."""

from __future__ import annotations

import subprocess
import sys


def test_ops_import_neither_transformers_nor_packing():
    code = ("import sys, fasteto.ops; print(sorted(m for m in "
            "('transformers', 'fasteto.packing', 'fasteto.data') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout
