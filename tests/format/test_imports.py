"""The format package is the contract every reader shares: it must load without the
converter's or the runtime's heavy dependencies."""

import subprocess
import sys


def test_format_imports_neither_torch_nor_transformers():
    code = "import sys, onepass_prep.format; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
