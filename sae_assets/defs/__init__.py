"""The Dagster layer: thin assets over sae_assets.core, reading and writing through resources."""
