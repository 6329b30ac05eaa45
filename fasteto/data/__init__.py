"""Trajectories and pairs: ETO's file formats and the pair rule."""

from fasteto.data.types import HUMAN, GPT, Message, Pair, Trajectory

__all__ = ["HUMAN", "GPT", "Message", "Pair", "Trajectory"]
