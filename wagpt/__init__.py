"""wagpt: the library behind the commands of this repository (train.py, average.py, ...).

Its modules are the building blocks the commands, benchmarks, experiments and tests share; the
top level keeps the model (model.py), the averaging math (averaging.py) and the commands. The
package has a name of its own so that none of its modules can hide an installed package: a
top-level `kernels/` did, once transformers began importing Hugging Face's `kernels`.
"""
