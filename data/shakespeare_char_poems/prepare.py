"""
The 5 poems of the complete works (the Sonnets, The Rape of Lucrece, A Lover's Complaint, The
Passionate Pilgrim, The Phoenix and the Turtle), character level, with the vocabulary of the
complete works (data/shakespeare_char/prepare.py): the fine-tuning text of
experiments/bema_finetune.py, after pretraining on data/shakespeare_char_plays.

    python -m data.shakespeare_char_poems.prepare
"""

from pathlib import Path

from data.shakespeare_char import prepare

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    prepare.main(HERE, subset="poems")
