"""The pipeline around tlflax: DVC stage scripts, the Prefect flow, reports, tools."""
