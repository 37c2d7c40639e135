"""Hugging Face transformers export and import of jaxlm models and tokenizers.

`save_hf` / `import_hf` convert weights (`convert.py`, with each family's mapping in `bert.py`
and `modernbert.py`, built from `mapping.py`), `export_tokenizer` / `import_tokenizer` the
tokenizer (`tokenizer.py`); `python -m jaxlm.export` writes a whole run. transformers and torch
(the `hf` extra) are imported only when a function needs them.
"""

from jaxlm.hf.convert import (EXTRA_FILE, Exported, Overlaid, check_exportable, from_hf,
                              import_hf, overlay, save_hf, to_hf)
from jaxlm.hf.tokenizer import export_tokenizer, import_tokenizer, jaxlm_ids

__all__ = ["EXTRA_FILE", "Exported", "Overlaid", "check_exportable", "export_tokenizer", "from_hf",
           "import_hf", "import_tokenizer", "jaxlm_ids", "overlay", "save_hf", "to_hf"]
