"""Activations stage: caching hook outputs over token shards (`caching`) and reading activation
tables back as tensors, shuffled or in order (`reader`)."""
