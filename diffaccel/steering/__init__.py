"""diffaccel.steering (in progress)."""
