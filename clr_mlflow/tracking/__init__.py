"""The only place mlflow is imported: runs, the per-iteration logger, delivery with its spool, artifacts and reading histories back."""
