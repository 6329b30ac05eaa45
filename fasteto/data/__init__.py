"""Trajectories and pairs: ETO's file formats and the pair rule."""

from fasteto.data.types import GPT, HUMAN, Message, Pair, Trajectory

__all__ = ["HUMAN", "GPT", "Message", "Pair", "Trajectory"]
