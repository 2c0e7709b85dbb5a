"""The datasets shipped inside the package, each checked against its sha256.

Every file here is a public dataset (see DATA_LICENSES.md for sources and licenses).
They ship with the course so that nothing needs the network; the hash check catches
a file damaged or edited by accident before it silently changes a result.
"""
from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from .download import ChecksumError, sha256_of

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# file name (relative to ASSETS_DIR) -> sha256
SHIPPED_FILES: dict[str, str] = {
    "the-verdict.txt": "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    "SMSSpamCollection": "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
    "instruction-data.json": "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    "instruction-data-with-preference.json": "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    "gpt2/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@lru_cache(maxsize=None)
def asset_path(name: str) -> Path:
    """Path of a shipped file, after checking its sha256 (once per process)."""
    if name not in SHIPPED_FILES:
        raise KeyError(f"Unknown dataset file {name!r}; shipped files are: {sorted(SHIPPED_FILES)}")
    path = ASSETS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing. Reinstall the course package (pip install -e .) from a full checkout."
        )
    actual = sha256_of(path)
    if actual != SHIPPED_FILES[name]:
        raise ChecksumError(
            f"{path} has sha256 {actual}, expected {SHIPPED_FILES[name]}: the file was changed or "
            f"damaged. Restore it with `git checkout -- {path.name}` or reinstall the package."
        )
    return path


def load_the_verdict() -> str:
    """The short story "The Verdict" (Edith Wharton, 1908): 20,479 characters of text."""
    return asset_path("the-verdict.txt").read_text(encoding="utf-8")


def load_sms_spam() -> list[tuple[str, str]]:
    """The SMS Spam Collection as ``(label, text)`` pairs, label ``"ham"`` or ``"spam"``.

    Read with quoting off: messages may contain unbalanced double quotes, and a CSV
    reader that honours quotes would glue neighbouring lines together.
    """
    with open(asset_path("SMSSpamCollection"), encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(label, text) for label, text in rows]


def load_instruction_data(with_preference: bool = False) -> list[dict[str, str]]:
    """The 1,100 instruction examples (keys ``instruction``, ``input``, ``output``).

    With ``with_preference=True`` each entry also has ``chosen`` and ``rejected``.
    """
    name = "instruction-data-with-preference.json" if with_preference else "instruction-data.json"
    with open(asset_path(name), encoding="utf-8") as handle:
        return json.load(handle)
