"""``import torchdist`` (and its subpackages) loads none of the heavy optional libraries.

One fresh interpreter checks them all: each check needs an interpreter that has imported nothing
else, and starting one costs a whole ``import torch`` (seconds on the 2-core CI machine), so the
checks that used to start one each (torchao and friends in ``test_precision.py``, DeepSpeed in
``test_deepspeed.py``, transformers in ``test_hf_blocks.py``) share this one. Importing at least
the torchdist modules each of them did is as strict: imports only add to ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAVY = ("deepspeed", "torchao", "msamp", "transformer_engine", "transformers")

CODE = f"""
import json, sys
import torchdist, torchdist.sharding, torchdist.checkpoint, torchdist.transforms
import torchdist.blocks, torchdist.precision as p
p.Float8Recipe.rowwise()  # building a recipe is configuration: it must not import torchao
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))
"""


def test_import_torchdist_loads_no_heavy_optional_library():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], out.stdout
