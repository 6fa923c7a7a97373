"""Ready-made model presets and the small assets they ship with."""
