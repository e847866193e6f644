"""uoe_nb: the executable companion library of the UOE paper.

Modules are named after the paper's ideas: :mod:`uoe_nb.moe` (routers and experts of
every MoE family), :mod:`uoe_nb.world` (the tiny synthetic benchmark),
:mod:`uoe_nb.zoo` (tiny MoE checkpoints), :mod:`uoe_nb.evaluation` (lm-eval and
RWKU-style probes), :mod:`uoe_nb.mode` (the tiny/full switch).
"""

__version__ = "0.1.0"
