"""Features stage: per-shard feature samples (`sampling`), their exact merge (`merge`), the
two-pass context windows (`windows`) and the browser's documents (`site_data`)."""
