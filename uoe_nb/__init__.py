"""uoe_nb: the executable companion library of the UOE paper.

Modules are named after the paper's ideas: :mod:`uoe_nb.moe` (routers and experts of
every MoE family), :mod:`uoe_nb.routing` (routing statistics), :mod:`uoe_nb.world`
(the tiny synthetic benchmark), :mod:`uoe_nb.zoo` (tiny MoE checkpoints),
:mod:`uoe_nb.evaluation` and :mod:`uoe_nb.data` (lm-eval, RWKU-style probes, real
data), :mod:`uoe_nb.attribution` (Eq. 2), :mod:`uoe_nb.objectives` (Eq. 3-4 and the
baselines' losses), :mod:`uoe_nb.scopes` (what may change), :mod:`uoe_nb.trainable` (how it trains: the
trained experts as parameters of their own, fp32 master weights), :mod:`uoe_nb.unlearn`
(the training entry point), :mod:`uoe_nb.fastpath` (not paying for frozen layers),
:mod:`uoe_nb.tradeoff` (comparing runs at matched forgetting), :mod:`uoe_nb.diagnostics`
and :mod:`uoe_nb.patches`, :mod:`uoe_nb.plan` and :mod:`uoe_nb.budget` (what a chapter
will cost), and :mod:`uoe_nb.mode` (the tiny/full switch, device and precision).
"""

__version__ = "0.1.0"
