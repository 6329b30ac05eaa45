"""Drop-ins that bring fasteto's ops into other training libraries.

Each integration is its own module and imports its library only when that module is imported, so
``import fasteto`` never needs them: ``fasteto.integrations.trl`` (TRL's ``DPOTrainer`` with fused
log-probs and multi-turn model-token masks).
"""
