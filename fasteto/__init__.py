"""fasteto: exploration-based trajectory optimisation (ETO) for LLM agents, fast.

Data flows one way: ``envs`` (+ rollout) produce trajectories, ``data`` builds pairs from them,
and the trainer consumes the pairs.
"""

__version__ = "0.1.0"
