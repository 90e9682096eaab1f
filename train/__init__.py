"""Fine-tuning from one YAML recipe: `python -m train RECIPE`, `tunewright train RECIPE`, or from Python:

    from train import train_recipe
    run_dir = train_recipe("recipes/demo.yaml", ["training.max_steps=20"])
"""

from train.api import train_recipe

__all__ = ["train_recipe"]
