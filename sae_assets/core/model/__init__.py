"""Model stage: the language model (`lm`: build, boot, load, hook checks, losses) and its
training loop (`training`)."""
