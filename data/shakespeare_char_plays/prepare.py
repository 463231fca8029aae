"""
The 37 plays of the complete works, character level, with the vocabulary of the complete works
(data/shakespeare_char/prepare.py): the pretraining text of experiments/bema_finetune.py, whose
fine-tuning text is data/shakespeare_char_poems.

    python -m data.shakespeare_char_plays.prepare
"""

from pathlib import Path

from data.shakespeare_char import prepare

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    prepare.main(HERE, subset="plays")
