"""diffaccel.rewards (in progress)."""
