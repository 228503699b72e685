"""Dagster resources and storage backends: the only package that touches I/O and credentials."""

from resources.dagster_resources import ArtifactStorage, RunSettings

__all__ = ["ArtifactStorage", "RunSettings"]
