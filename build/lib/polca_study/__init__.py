"""polca-study: hidden breakthroughs in model training."""
