"""
The 37 plays of the complete works, character level, with the vocabulary of the complete works
(data/shakespeare_char/prepare.py): the pretraining text of experiments/bema_finetune.py, whose
fine-tuning text is data/shakespeare_char_poems.

    python data/shakespeare_char_plays/prepare.py
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:  # run as a script: make `data` importable
    sys.path.insert(0, str(HERE.parents[1]))

from data.shakespeare_char import prepare  # noqa: E402

if __name__ == "__main__":
    prepare.main(HERE, subset="plays")
