"""diffaccel.shapeworld (in progress)."""
