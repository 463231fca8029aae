"""
The 5 poems of the complete works (the Sonnets, The Rape of Lucrece, A Lover's Complaint, The
Passionate Pilgrim, The Phoenix and the Turtle), character level, with the vocabulary of the
complete works (data/shakespeare_char/prepare.py): the fine-tuning text of
experiments/bema_finetune.py, after pretraining on data/shakespeare_char_plays.

    python data/shakespeare_char_poems/prepare.py
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:  # run as a script: make `data` importable
    sys.path.insert(0, str(HERE.parents[1]))

from data.shakespeare_char import prepare  # noqa: E402

if __name__ == "__main__":
    prepare.main(HERE, subset="poems")
