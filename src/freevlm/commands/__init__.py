"""The functions behind the `freevlm` commands, one module per command (`train` holds both training stages), and
`common.py` for what several of them share. Each takes plain typed arguments and works from Python as well
(`freevlm.commands.evaluate.evaluate(...)`); `freevlm.cli` turns their signatures and docstrings into the command
line.

Dataset arguments are shared: `dataset` names a format (see `freevlm.data.datasets`), `data` / `images` /
`questions` point at its files, `split` picks the split.
"""
