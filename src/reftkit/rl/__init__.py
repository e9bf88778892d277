"""RL maths: the PPO objective, advantage estimators and the registry of RL methods."""
