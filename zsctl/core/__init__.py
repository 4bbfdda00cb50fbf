"""Library core: schemas, artifacts, prompts, metrics, models, data. Never imports stages, typer or rich."""
