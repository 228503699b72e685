"""Writing tiny run configs for tests: a base mapping, a storage section and per-section overrides."""

import uuid

import yaml


def write_run_config(directory, base: dict, storage: dict, **sections: dict) -> str:
    """Write `base` with `storage` and each section's keys laid over it; return the file's path."""
    data = {**base, "storage": storage}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path = directory / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)
